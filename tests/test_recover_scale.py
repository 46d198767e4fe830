"""Recovery at scale: streamed data with flat memory, data-parallel processes, checkpoints that
resume exactly, and synthetic data from the model's BatchNorm statistics (issue 24).

The full comparisons (every K, whole data sets, several seeds) are benchmarks:
``benchmarks/recovery_scale.py`` (processes, resume) and ``benchmarks/recovery.py --data synth``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE, ROOT

from lcpc import frontend, pipeline, planner
from lcpc.errors import Interrupted, LcpcError
from lcpc.passes.recover.distil import Execution

torch = pytest.importorskip("torch")
digits = pytest.importorskip("examples.digits.data")
from lcpc.passes.recover import distil, synth  # noqa: E402
from torch_fixtures import one_thread, split  # noqa: E402, F401 - module fixtures

EXAMPLE_BN = ROOT / "examples" / "digits" / "digits_cnn_bn.onnx"
PROBE = Path(__file__).with_name("memory_probe.py")


@pytest.fixture(scope="module")
def plan4():
    graph, source = frontend.load(EXAMPLE)
    return planner.plan(graph, source, 4, "none")


def _weights(plan) -> dict[str, np.ndarray]:
    return {k: v for k, v in plan.graph.constants.items()}


# ----------------------------------------------------------------------------- streaming, flat memory
def _probe(*args: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_recovery_memory_is_flat_in_the_number_of_samples():
    """Refit and one epoch on a memory-mapped .npy of 1200 then 2000 64x64 RGB samples (after a warm-up
    run): the peak anonymous memory does not grow with the 39 MB of extra data (a quarter of it
    is allowed, for noise), and the manifest records each data set."""
    got = _probe("recover", "200", "1200", "2000")
    growth = got["peaks"][2] - got["peaks"][1]
    extra = got["bytes"][2] - got["bytes"][1]
    assert growth < extra / 4, f"peak grew {growth / 2**20:.1f} MB for {extra / 2**20:.0f} MB more data"


def test_image_folder_streams_through_a_worker():
    """A folder (in subfolders) of 1500 images, 74 MB as float inputs, read once in training
    batches by a data-loader process: every image, as written, and memory grows by under 10 MB."""
    got = _probe("read", "1500")
    assert got["files"] == 1500 and got["bytes"] > 70e6
    assert got["peak"] - got["before"] < 10 * 2**20


def test_recover_from_an_image_folder(split, tmp_path):
    """`lcpc recover --data FOLDER --workers 1`: the digits as PNG files in subfolders, read with
    the folder's preprocessing by a data-loader process; the manifest records the folder."""
    from click.testing import CliRunner
    from PIL import Image

    from lcpc.cli import main

    for i, image in enumerate(split[0][:48]):
        sub = tmp_path / "images" / f"d{split[1][i]}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 16).round().astype(np.uint8)).save(sub / f"{i}.png")
    main(["convert", str(EXAMPLE), "-k", "2", "-o", str(tmp_path / "cut"), "--preprocess",
          "size=8x8,channels=L,std=16"], standalone_mode=False)
    result = CliRunner().invoke(main, ["recover", str(tmp_path / "cut"), "--data", str(tmp_path / "images"),
                                       "--epochs", "1", "--workers", "1", "-o", str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    recovery = json.loads((tmp_path / "rec" / "manifest.json").read_text())["fidelity"]["recovery"]
    assert recovery["data"] == {"kind": "real", "samples": 48, "source": "images",
                                "path": str((tmp_path / "images").resolve())}
    assert recovery["distillation"]["workers"] == 1 and recovery["distillation"]["epochs_run"] == 1


def test_bad_image_in_a_worker_is_one_line(tmp_path):
    from PIL import Image

    from lcpc.passes.recover.loader import Batches

    (tmp_path / "a" / "b").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(tmp_path / "a" / f"{i}.png")
    (tmp_path / "a" / "b" / "broken.png").write_bytes(b"not a png")
    samples = pipeline.recovery_data(tmp_path, {"size": [8, 8], "channels": "L"})
    assert len(samples) == 7
    with pytest.raises(LcpcError) as err:
        list(Batches(samples, np.arange(7), 2, workers=1))
    assert "broken.png: cannot read it as an image" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- resume
def test_resumed_runs_end_where_the_uninterrupted_run_ends(plan4, split, tmp_path):
    """2 epochs uninterrupted; the same stopped by Ctrl-C in epoch 1 (a checkpoint of the step
    reached) and resumed; the same killed in epoch 2 (nothing saved then: the end of epoch 1 is
    what the checkpoint holds) and resumed: all three end with the same weights and figures."""
    x = split[0][:160]

    def run(folder=None, resume=False, progress=None):
        return distil.run(plan4, x, epochs=2, progress=progress,
                          execution=Execution(device="cpu", checkpoint=folder, resume=resume))

    want, want_report = run()

    def ctrl_c(epoch, step, steps, loss, agreement):
        if (epoch, step) == (1, 10):
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag: it stops at the next step

    with pytest.raises(Interrupted, match=r"interrupted at epoch 1, step 10 of 18; the checkpoint in .* --resume"):
        run(tmp_path / "a", progress=ctrl_c)
    got, report = run(tmp_path / "a", resume=True)
    assert report["checkpoint"]["resumed_from"] == {"epoch": 1, "steps_done": 10}

    class Killed(Exception):
        pass

    def crash(epoch, step, steps, loss, agreement):
        if (epoch, step) == (2, 5):
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "b", progress=crash)
    summary = json.loads((tmp_path / "b" / "recovery.json").read_text())
    assert summary["epochs_done"] == 1 and not summary["interrupted"]
    killed, killed_report = run(tmp_path / "b", resume=True)
    assert killed_report["checkpoint"]["resumed_from"] == {"epoch": 2, "steps_done": 0}
    for name, value in _weights(want).items():
        assert np.array_equal(value, _weights(got)[name]), name
        assert np.array_equal(value, _weights(killed)[name]), name
    assert report["after"] == killed_report["after"] == want_report["after"]
    assert [h["loss"] for h in report["history"]] == [h["loss"] for h in want_report["history"]]


def test_checkpoint_folders_are_not_mixed_up(plan4, split, tmp_path):
    x = split[0][:120]
    distil.run(plan4, x, epochs=1, execution=Execution(device="cpu", checkpoint=str(tmp_path / "c")))
    with pytest.raises(LcpcError, match="holds the checkpoint of an earlier recovery; pass --resume"):
        distil.run(plan4, x, epochs=1, execution=Execution(device="cpu", checkpoint=str(tmp_path / "c")))
    with pytest.raises(LcpcError, match=r"of another recovery \(its recipe, seed differ"):
        distil.run(plan4, x, epochs=1, seed=1, lr=1e-3,
                   execution=Execution(device="cpu", checkpoint=str(tmp_path / "c"), resume=True))
    with pytest.raises(LcpcError, match="holds no checkpoint"):
        distil.run(plan4, x, epochs=1, execution=Execution(device="cpu", checkpoint=str(tmp_path / "d"), resume=True))
    with pytest.raises(LcpcError, match="--resume continues from a --checkpoint folder"):
        Execution(resume=True)


# ----------------------------------------------------------------------------- processes
def test_two_gloo_processes_match_one(plan4, split):
    """One epoch on 400 digits, 1 process and 2 (gloo): the same steps over the same samples
    (the global batch split in two, BatchNorm statistics over the whole batch), so the same
    weights up to the order of floating-point sums, and the same held-out figures."""
    x = split[0][:400]
    one_steps, two_steps = [], []
    one_plan, one = distil.run(plan4, x, epochs=1, progress=lambda *a: one_steps.append(a),
                               execution=Execution(device="cpu"))
    two_plan, two = distil.run(plan4, x, epochs=1, progress=lambda *a: two_steps.append(a),
                               execution=Execution(device="cpu", procs=2))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["throughput"]["samples"] == one["throughput"]["samples"] == 45 * 8
    assert len(two_steps) == len(one_steps) == 46  # relayed from process 0: every step, then the epoch
    for name, value in _weights(one_plan).items():
        other = _weights(two_plan)[name]
        assert np.abs(value - other).max() <= 1e-4 * max(np.abs(value).max(), 1e-6), name
    assert two["after"]["top1_agreement"] == one["after"]["top1_agreement"] > 0.9
    assert two["after"]["kl_divergence"] == pytest.approx(one["after"]["kl_divergence"], rel=1e-3)


def _killed_worker(rank: int, world: int, job, channel) -> dict:
    """Process 1 dies of SIGKILL after a first collective; process 0 waits in a second one."""
    import torch.distributed as dist

    dist.barrier()
    channel.send("distil", rank)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return {}


def test_a_killed_process_ends_the_run_in_one_line():
    """SIGKILL one of 2 gloo processes while the other waits for it: the other is stopped, and
    the error names the process and the signal, in one line, well within the wait bound."""
    from lcpc.passes.recover import launch

    heard = []
    start = time.monotonic()
    with pytest.raises(LcpcError) as err:
        launch.spawn(_killed_worker, None, 2, "cpu", timeout=60, threads=1,
                     on_message=lambda kind, payload: heard.append(payload))
    assert time.monotonic() - start < 60
    assert str(err.value) == "recovery process 1 of 2 failed: it was killed by SIGKILL"
    assert sorted(heard) == [(0,), (1,)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_recovery_with_mixed_precision(plan4, split):
    """On CUDA (bf16 autocast, one NCCL process per GPU when there are two), distillation keeps
    the cut and recovers the held-out agreement as on the CPU."""
    from lcpc.weights import weight_masks

    procs = 2 if torch.cuda.device_count() >= 2 else 1
    new, report = distil.run(plan4, split[0][:600], epochs=1, execution=Execution(device="cuda", procs=procs))
    assert report["device"].startswith("cuda") and report["processes"] == procs
    assert report["after"]["top1_agreement"] > 0.9
    for node_name, mask in weight_masks(plan4).items():
        node = new.graph.node(node_name)
        assert not np.any(new.graph.constants[node.inputs[1]] * (1 - mask))


# ----------------------------------------------------------------------------- synthetic data
@pytest.fixture(scope="module")
def bn_model():
    norms: list = []
    graph, source = frontend.load(EXAMPLE_BN, norms=norms)
    return graph, source, norms


def _batch_stats(graph, stats, x):
    from lcpc.passes.recover.torch_graph import GraphModule

    values = GraphModule(graph).eval().run({graph.inputs[0]: torch.from_numpy(x)}, [s.tensor for s in stats])
    out = []
    for s in stats:
        v = values[s.tensor].detach().transpose(0, 1).flatten(1)
        z = (v - s.shift[:, None]) / s.scale[:, None]
        out.append((z.mean(1), z.var(1, unbiased=False)))
    return out


def test_statistics_are_located_on_the_folded_graph(bn_model, split):
    """Each BatchNorm folded into a Conv is found on the Conv's output and mapped back exactly:
    the pre-BatchNorm batch statistics recovered from the folded graph (in torch) equal those of
    the BatchNorm inputs of the original file, run by onnxruntime, on the same images."""
    import onnx
    import onnxruntime as ort

    graph, source, norms = bn_model
    stats = synth.locate(graph, norms, source.path)
    assert len(stats) == len(norms) == 11
    model = onnx.load(EXAMPLE_BN)
    bn_input = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "BatchNormalization"}
    for s in stats:
        model.graph.output.append(onnx.ValueInfoProto(name=bn_input[s.tensor]))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = split[0][:256]
    wanted = session.run([bn_input[s.tensor] for s in stats], {"input": x})
    for (mean, var), value, s in zip(_batch_stats(graph, stats, x), wanted, stats):
        v = value.transpose(1, 0, 2, 3).reshape(value.shape[1], -1).astype(np.float64)
        keep = s.keep.numpy()
        assert np.allclose(mean.numpy()[keep], v.mean(1)[keep], rtol=1e-3, atol=1e-3 * v.std())
        assert np.allclose(var.numpy()[keep], v.var(1)[keep], rtol=1e-3, atol=1e-6)
        assert not np.allclose(v.mean(1)[keep], 0) and s.tensor not in bn_input.values()


def test_synthetic_inputs_take_the_batchnorm_statistics(bn_model):
    """60 iterations on 64 inputs: the BatchNorm loss falls fivefold from noise, every input's target class
    is spread evenly, and the same seed gives the same inputs."""
    graph, source, norms = bn_model
    stats = synth.locate(graph, norms, source.path)
    x, report = synth.synthesise(graph, stats, 64, iterations=60, batch=64)
    assert x.shape == (64, 1, 8, 8) and x.dtype == np.float32
    assert report["batchnorm_loss"]["end"] < report["batchnorm_loss"]["start"] / 5
    assert report["batchnorm_layers"] == 11 and report["iterations_run"]["min"] == 60
    assert report["predicted_classes"] >= 8
    again, _ = synth.synthesise(graph, stats, 64, iterations=60, batch=64)
    assert np.array_equal(x, again)


def test_folded_batchnorm_is_refused_by_name(tmp_path):
    norms: list = []
    graph, source = frontend.load(EXAMPLE, norms=norms)
    with pytest.raises(LcpcError, match=r"digits_cnn.onnx: has no BatchNormalization layer.*do_constant_folding"):
        synth.locate(graph, norms, source.path)
    pipeline.convert(EXAMPLE, tmp_path / "cut", 2, "none")
    from click.testing import CliRunner

    from lcpc.cli import main
    result = CliRunner().invoke(main, ["recover", str(tmp_path / "cut"), "--data", "synth:64", "-o",
                                       str(tmp_path / "rec")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "has no BatchNormalization" in result.output
    assert not (tmp_path / "rec").exists()


def test_recover_from_synthetic_data_records_it(tmp_path):
    """`lcpc recover --data synth:64 --synth-time 2 --checkpoint DIR`: the synthesis stops by its
    time bound and says so, recovery trains on the synthetic inputs, the manifest records them;
    `--resume` reads the kept inputs back instead of synthesising new ones, and a fresh run in
    the same folder is refused."""
    from click.testing import CliRunner

    from lcpc.cli import main

    pipeline.convert(EXAMPLE_BN, tmp_path / "cut", 4, "none")
    args = ["recover", str(tmp_path / "cut"), "--data", "synth:64", "--synth-time", "2", "--epochs", "1",
            "--checkpoint", str(tmp_path / "ckpt")]
    start = time.monotonic()
    result = CliRunner().invoke(main, args + ["-o", str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    assert "data: synthetic, 64 samples" in result.output and "the time bound (2 s) cut the synthesis" in result.output
    data = json.loads((tmp_path / "rec" / "manifest.json").read_text())["fidelity"]["recovery"]["data"]
    assert data["kind"] == "synthetic" and data["samples"] == 64 and data["source"] == "synthesised"
    assert data["synthesis"]["seconds"] < 2 + 2 and data["synthesis"]["batchnorm_layers"] == 11
    assert time.monotonic() - start < 60
    resumed = CliRunner().invoke(main, args + ["--resume", "-o", str(tmp_path / "again")])
    assert resumed.exit_code == 0, resumed.output
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())["fidelity"]["recovery"]
    assert again["data"] == data and again["distillation"]["checkpoint"]["resumed_from"] == {"epoch": 2,
                                                                                             "steps_done": 0}
    refused = CliRunner().invoke(main, args + ["-o", str(tmp_path / "third")])
    assert refused.exit_code == 1 and "holds the checkpoint of an earlier recovery" in refused.output


# ----------------------------------------------------------------------------- the command line
def test_recovery_options_are_checked(tmp_path):
    """Each misuse ends in one line naming the option, before any work."""
    from click.testing import CliRunner

    from lcpc.cli import main
    from lcpc.passes.recover.samples import Synthetic

    assert Synthetic.parse("synth") == Synthetic() and Synthetic.parse("synth:64").samples == 64
    assert Synthetic.parse("synthetic") is None and Synthetic.parse("data/synth:1") is None
    pipeline.convert(EXAMPLE, tmp_path / "cut", 2, "none")
    np.save(tmp_path / "labels.npy", np.zeros(10, np.int64))
    np.savez(tmp_path / "train.npz", x=np.zeros((10, 1, 8, 8), np.float32))
    recover = ["recover", str(tmp_path / "cut"), "-o", str(tmp_path / "rec")]
    cases = [
        (recover + ["--data", "synth:64", "--labels", str(tmp_path / "labels.npy")], "synthetic inputs (--data synth)"),
        (recover + ["--data", "synth:2"], "synthesise at least 4 samples"),
        (recover + ["--data", str(tmp_path / "train.npz")], "an .npz cannot be memory-mapped"),
        (recover + ["--data", str(tmp_path / "missing")], "no such data file or image folder"),
        (recover + ["--data", "synth", "--resume"], "--resume continues from a --checkpoint folder"),
        (recover + ["--data", "synth", "--procs", "0"], "--procs 0: must be at least 1"),
        (recover + ["--data", "synth", "--synth-iterations", "0"], "--synth-iterations 0"),
        (["convert", str(EXAMPLE), "-o", str(tmp_path / "c"), "--procs", "2"], "pass --recover TRAIN too"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and message in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "rec").exists() and not (tmp_path / "c").exists()
