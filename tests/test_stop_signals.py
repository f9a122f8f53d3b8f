"""A signal is honoured at every point of a stage and of the main job: during the last step, the final
evaluation, the export of the model, and between the main job's stages. Each case sends the signal from a hook
at that point, in this process, and checks that the stage stops, says where its work is saved and how to resume,
and carries the signal's exit code."""

import os
import signal

import pytest

from bart_jax.errors import Interrupted
from bart_jax.train import config as C
from toy_batches import SMALL_MODEL_OVERRIDES

STEPS = 2


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from bart_jax.data import builtin_documents, train_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(builtin_documents()["train"][:200], 512, directory)
    return str(directory)


def _cfg(workdir, tokenizer_dir, *extra):
    return C.load_config("tiny", [
        f"workdir={workdir}", f"data.tokenizer={tokenizer_dir}", f"pretrain.train.steps={STEPS}",
        "pretrain.train.batch_size=8", "pretrain.train.source_length=16", "pretrain.schedule.warmup_steps=0",
        "pretrain.train.checkpoint_every=100", "pretrain.train.eval_batches=1", "pretrain.train.progress_bar=false",
        "pretrain.train.log_every=1", "pretrain.train.peak_flops_per_device=1e9", *SMALL_MODEL_OVERRIDES, *extra])


def _kill_self(signum):
    os.kill(os.getpid(), signum)


class _SignalAtLastStep:
    """A reporter that sends `signum` to this process when the last step settles (after the loop's last
    step-boundary check)."""

    def __init__(self, signum):
        self.signum = signum

    def resumed(self, *args):
        pass

    def step(self, stage, step_no, metrics, speed):
        if step_no == STEPS:
            _kill_self(self.signum)


def _assert_stopped_at_last_step(e: Interrupted, workdir, signum):
    checkpoint = os.path.join(workdir, "pretrain", "checkpoints", str(STEPS))
    assert e.exit_code == 128 + signum
    assert str(e) == (f"interrupted at step {STEPS} (pretrain); checkpoint saved in {checkpoint}; run the same "
                      "command to resume")
    assert os.path.isdir(checkpoint)
    assert not os.path.exists(os.path.join(workdir, "pretrain", "model"))  # the stage did not go on to export


@pytest.mark.integration
def test_signal_during_last_step_stops_the_stage(tmp_path, tokenizer_dir):
    from bart_jax.train.loop import pretrain

    cfg = _cfg(tmp_path / "run", tokenizer_dir, "pretrain.train.eval_every=0")
    with pytest.raises(Interrupted) as info:
        pretrain(cfg, reporter=_SignalAtLastStep(signal.SIGINT))
    _assert_stopped_at_last_step(info.value, cfg.workdir, signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


@pytest.mark.integration
def test_signal_during_final_evaluation_stops_the_stage(tmp_path, tokenizer_dir, monkeypatch):
    from bart_jax.train import loop

    evaluate = loop.evaluate

    def evaluate_then_signal(s, params):
        _kill_self(signal.SIGTERM)
        return evaluate(s, params)

    monkeypatch.setattr(loop, "evaluate", evaluate_then_signal)
    cfg = _cfg(tmp_path / "run", tokenizer_dir, f"pretrain.train.eval_every={STEPS}")
    with pytest.raises(Interrupted) as info:
        loop.pretrain(cfg)
    _assert_stopped_at_last_step(info.value, cfg.workdir, signal.SIGTERM)


@pytest.mark.integration
def test_signal_during_export_stops_after_it(tmp_path, tokenizer_dir, monkeypatch):
    from bart_jax.train import loop

    gather = loop._gather_params

    def signal_then_gather(params):
        _kill_self(signal.SIGINT)
        return gather(params)

    monkeypatch.setattr(loop, "_gather_params", signal_then_gather)
    cfg = _cfg(tmp_path / "run", tokenizer_dir, "pretrain.train.eval_every=0")
    with pytest.raises(Interrupted) as info:
        loop.pretrain(cfg)
    model_dir = os.path.join(os.path.abspath(cfg.workdir), "pretrain", "model")
    assert info.value.exit_code == 130
    assert str(info.value) == (f"interrupted at the end of pretrain (step {STEPS}; its model is in {model_dir}); "
                               "run the same command to resume")
    assert os.path.isfile(os.path.join(model_dir, "bart_config.json"))  # the export finished first


class _Recorder:
    def __init__(self):
        self.stages = []

    def started(self, *args):
        pass

    def stage(self, number, title):
        self.stages.append(number)

    def tokenizer_ready(self, *args):
        pass


def test_signal_between_main_job_stages_stops_the_job(tmp_path, monkeypatch):
    """SIGINT while the pretrained model is measured (between the training stages): the job stops there with
    the resume line; fine-tuning never starts. The stages themselves are stand-ins (this checks the control
    flow of the job, not training)."""
    from bart_jax import pipeline
    from bart_jax.train import inputs, loop

    class Done:
        model_dir = str(tmp_path / "model")

    finetuned = []

    def stage(cfg, name, **kw):
        return Done() if name == "pretrain" else finetuned.append(cfg)

    monkeypatch.setattr(pipeline, "check_job_data", lambda cfg: None)
    monkeypatch.setattr(inputs, "load_or_train_tokenizer", lambda cfg: (type("T", (), {"vocab_size": 1})(), "tok"))
    monkeypatch.setattr(loop, "run_stage", stage)
    monkeypatch.setattr(pipeline, "evaluate_denoiser", lambda *a, **kw: _kill_self(signal.SIGINT))
    recorder = _Recorder()
    with pytest.raises(Interrupted) as info:
        pipeline.run_main_job(workdir=str(tmp_path / "job"), progress=recorder)
    assert info.value.exit_code == 130
    assert str(info.value) == ("interrupted during stage 2/5 (denoising pretraining); finished stages are kept; "
                               "run the same command to resume")
    assert recorder.stages == [1, 2] and finetuned == []
