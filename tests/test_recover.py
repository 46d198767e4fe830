"""Recovery: the torch executor equals onnxruntime, BatchNorm folding is exact, the
cut structure survives training, distillation recovers the digits example, and too
little data is called out."""

from __future__ import annotations


import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import EXAMPLE, ZOO, reference, rel_err, run_folder

from lcpc import frontend, planner
from lcpc.errors import LcpcError
from lcpc.ir import to_onnx
from lcpc.lower import lower
from lcpc.passes.recover import distil as recover
from lcpc.weights import weight_masks
from lcpc.targets import onnx as onnx_target

torch = pytest.importorskip("torch")
digits = pytest.importorskip("examples.digits.data")
from torch_fixtures import one_thread, split  # noqa: E402, F401 - module fixtures
from lcpc.pipeline import recover_plan  # noqa: E402
from lcpc.passes.recover.norms import channel_stats  # noqa: E402
from lcpc.passes.recover.student import Student, normable  # noqa: E402
from lcpc.passes.recover.torch_graph import GraphModule  # noqa: E402


def _eval(module, x: np.ndarray) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


# ----------------------------------------------------------------------------- GraphModule
@pytest.mark.parametrize("name", list(ZOO) + ["digits_example"])
def test_graph_module_matches_onnxruntime(name, zoo_bytes, split):
    model = EXAMPLE.read_bytes() if name == "digits_example" else zoo_bytes[name]
    graph, _ = frontend.load(model)
    # the example has a dynamic batch: run 16 images through a graph planned for 1
    x = split[2][:16] if name == "digits_example" else \
        np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert rel_err(_eval(GraphModule(graph), x), reference(model, {"input": x})[0]) < 1e-4


OPS_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
ops (float[N, 4, 8, 8] x) => (float[N, 6] y) {
  c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  r1 = LeakyRelu <alpha = 0.1> (c1)
  ct = ConvTranspose <strides = [2, 2], pads = [1, 1, 1, 1], output_padding = [1, 1]> (r1, wt, bt)
  ap = AveragePool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1], ceil_mode = 1> (ct)
  api = AveragePool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1], ceil_mode = 1,
                     count_include_pad = 1> (ct)
  mp = MaxPool <kernel_shape = [3, 3], strides = [2, 2], ceil_mode = 1> (ct)
  rs = Resize <mode = "nearest"> (mp, , s15)
  rl = Resize <mode = "linear"> (mp, , s15)
  ad = Add (rs, rl)
  bn = BatchNormalization (ad, bs, bb, bm, bv)
  pd = Pad <mode = "reflect"> (bn, pads)
  sg = Sigmoid (pd)
  hs = HardSigmoid (pd)
  ml = Mul (sg, hs)
  sb = Sub (ml, pd)
  dv = Div (sb, two)
  pa, pb = Split <axis = 1> (dv, split)
  ca = Concat <axis = 1> (pb, pa)
  sl = Slice (ca, starts, ends, axes, steps)
  ga = Gather <axis = 3> (sl, gidx)
  tr = Transpose <perm = [0, 1, 3, 2]> (ga)
  rm = ReduceMean <axes = [3], keepdims = 1> (tr)
  sq = Squeeze (rm, ax3)
  us = Unsqueeze (sq, ax2)
  gm = GlobalMaxPool (us)
  ga2 = GlobalAveragePool (ap)
  gi = GlobalAveragePool (api)
  g2 = Add (gm, ga2)
  g3 = Sub (g2, gi)
  fl = Flatten (g3)
  mm = MatMul (fl, wm)
  cl = Clip (mm, lo, hi)
  pr = PRelu (cl, slope)
  sm = Softmax <axis = 1> (pr)
  su = Sum (sm, pr, pr)
  rh = Reshape (su, shp)
  tn = Tanh (rh)
  y = Flatten (tn)
}
"""


def _ops_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(OPS_MODEL)
    rng = np.random.default_rng(0)

    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def i64(*values):
        return np.array(values, np.int64)

    consts = dict(
        w1=f(8, 4, 3, 3) * 0.3, b1=f(8), wt=f(8, 4, 3, 3) * 0.3, bt=f(4),
        s15=np.array([1, 1, 1.5, 1.5], np.float32), bs=rng.uniform(0.5, 1.5, 4).astype(np.float32), bb=f(4),
        bm=f(4) * 0.1, bv=rng.uniform(0.5, 1.5, 4).astype(np.float32), pads=i64(0, 0, 1, 2, 0, 0, 2, 1),
        two=np.array(2.0, np.float32), split=i64(1, 3), starts=i64(1), ends=i64(14), axes=i64(2), steps=i64(2),
        gidx=i64(3, 0, -1), ax3=i64(3), ax2=i64(2), wm=f(4, 6), lo=np.array(-1.0, np.float32),
        hi=np.array(1.5, np.float32), slope=f(6) * 0.2, shp=i64(-1, 3, 2))
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in consts.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def test_graph_module_ops_match_onnxruntime_node_by_node():
    """Every op of the list, at every node output, with a batch of 3 on a graph planned for 1."""
    model = _ops_model()
    graph, _ = frontend.load(model.SerializeToString())
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [o for n in model.graph.node for o in n.output if o != "y"]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    x = np.random.default_rng(1).standard_normal((3, 4, 8, 8)).astype(np.float32)
    want = dict(zip(["y"] + names, reference(probe.SerializeToString(), {"x": x})))
    module = GraphModule(graph).eval()
    with torch.no_grad():
        got = module.run({"x": torch.from_numpy(x)}, [n for n in want if n in graph.tensors])
    assert len(got) > 30
    for name, value in got.items():
        assert rel_err(value.numpy(), want[name]) < 1e-5, name


def test_unsupported_op_is_named():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) { y = LRN <size = 3> (x) }""")
    graph, _ = frontend.load(model.SerializeToString())
    with pytest.raises(LcpcError, match="recovery does not support op LRN yet") as err:
        GraphModule(graph)
    assert "node" in str(err.value)


@pytest.mark.parametrize("name", ["resnet_basic", "vgg", "mobilenet_v2"])
def test_export_folds_batchnorm_exactly(name, zoo_bytes):
    """Identity BatchNorms export to the masked graph itself; arbitrary ones fold exactly."""
    graph, source = frontend.load(zoo_bytes[name])
    plan = planner.plan(graph, source, 4, "none")
    masks = weight_masks(plan)
    norms = [n for n in normable(graph) if n not in plan.analysis.terminal]
    assert any(n.op == "Gemm" for n in graph.nodes if n.name in norms) == (name == "vgg")
    student = Student(graph, masks, norms)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    calib = torch.from_numpy(np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32))
    with student.norms_off():
        stats = channel_stats(student, calib, norms, "cpu")
        masked = _eval(student, x)
    student.init_norms_identity(stats)
    exported = to_onnx(plan.graph.__class__(graph.nodes, graph.inputs, graph.outputs, graph.tensors,
                                            student.export_constants(), graph.opset))
    assert rel_err(reference(exported.SerializeToString(), {"input": x})[0], masked) < 1e-4
    rng = np.random.default_rng(2)
    with torch.no_grad():
        for node in norms:
            bn = student.norm(node)
            for t in (bn.weight, bn.bias, bn.running_mean):
                t.copy_(torch.from_numpy(rng.standard_normal(t.shape).astype(np.float32)))
            bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, bn.running_var.shape).astype(np.float32)))
    constants = student.export_constants()
    exported = to_onnx(plan.graph.__class__(graph.nodes, graph.inputs, graph.outputs, graph.tensors,
                                            constants, graph.opset))
    assert rel_err(reference(exported.SerializeToString(), {"input": x})[0], _eval(student, x)) < 1e-4
    for node_name, mask in masks.items():
        node = next(n for n in graph.nodes if n.name == node_name)
        assert not np.any(constants[node.inputs[1]] * (1 - mask))


# ----------------------------------------------------------------------------- recovery
@pytest.fixture(scope="module")
def recovered(split):
    """The recovery pipeline (refit, then one epoch of distillation) on the digits example."""
    graph, source = frontend.load(EXAMPLE)
    plan = planner.plan(graph, source, 4, "none")
    steps = []

    class Progress:
        refit = None

        @staticmethod
        def distil(*a):
            steps.append(a)

    new_plan, figures = recover_plan(plan, split[0], epochs=1, progress=Progress)
    return plan, new_plan, figures, steps


def test_recovery_restores_held_out_agreement(recovered, split):
    plan, new_plan, figures, steps = recovered
    report = figures["distillation"]
    assert figures["refit"]["before"]["top1_agreement"] < 0.3
    # distillation starts from the refit plan: its start is where the refit ended
    assert report["stages"]["start"]["heldout"]["top1_agreement"] == figures["refit"]["after"]["top1_agreement"]
    assert 0.95 < report["after"]["top1_agreement"]
    assert report["after"] == report["stages"]["recovered"]["heldout"]
    assert report["samples"] == {"train": 1212, "heldout": 135}
    assert figures["refit"]["samples"] == {"train": 1024, "heldout": 135}
    assert not report["warnings"]
    # the test split was never seen: accuracy is back near the original's 99.56 %
    x_test, y_test = split[2], split[3]
    acc = float((_eval(GraphModule(new_plan.graph), x_test).argmax(1) == y_test).mean())
    cut_acc = float((_eval(Student(plan.graph, weight_masks(plan)), x_test).argmax(1) == y_test).mean())
    assert cut_acc < 0.3 and acc > 0.97
    # progress: one call per step, then the epoch's held-out agreement
    assert steps[-1][1] == steps[-1][2] == 1212 // report["recipe"]["batch_size"] and steps[-1][4] == report["after"]["top1_agreement"]


def test_recovered_plan_keeps_the_cut(recovered, split, tmp_path):
    """Same nodes, decisions and bytes; zero weights outside the blocks; the lowered plan
    computes exactly what the trained graph computes."""
    plan, new_plan, _, _ = recovered
    assert [n.name for n in new_plan.graph.nodes] == [n.name for n in plan.graph.nodes]
    assert new_plan.decisions == plan.decisions and new_plan.layouts == plan.layouts
    assert lower(new_plan).bytes_per_inference() == lower(plan).bytes_per_inference()
    for node_name, mask in weight_masks(plan).items():
        node = next(n for n in plan.graph.nodes if n.name == node_name)
        w = new_plan.graph.constants[node.inputs[1]]
        assert w.dtype == np.float32 and not np.any(w * (1 - mask)) and np.any(w != plan.graph.constants[node.inputs[1]])
    onnx_target.write(new_plan, lower(new_plan), tmp_path / "out")
    x = split[2][:8]
    got = run_folder(tmp_path / "out", {"input": x})[0]["logits"]
    trained = to_onnx(new_plan.graph).SerializeToString()  # planned for batch 1
    want = np.concatenate([reference(trained, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    assert rel_err(got, want) < 1e-4


def test_tiny_data_warns_of_overfitting(split):
    graph, source = frontend.load(EXAMPLE)
    plan = planner.plan(graph, source, 8, "none")
    _, report = recover.run(plan, split[0][:40], epochs=2, holdout=0.5, batch_size=8)
    warnings = " ".join(report["warnings"])
    assert "only 40 samples" in warnings
    assert "overfitting" in warnings
    rec = report["stages"]["recovered"]
    assert rec["train"]["top1_agreement"] - rec["heldout"]["top1_agreement"] > 0.1


def test_labels_add_accuracy_figures(split):
    graph, source = frontend.load(EXAMPLE)
    plan = planner.plan(graph, source, 2, "none")
    _, report = recover.run(plan, split[0][:300], split[1][:300], epochs=0)
    assert report["teacher"]["heldout"]["accuracy"] == report["after"]["reference_accuracy"]
    assert report["after"]["candidate_accuracy"] > report["before"]["candidate_accuracy"]
    assert report["epochs_run"] == 0 and "bn_reestimated" in report["stages"]


def test_views_copy_the_batch(split):
    """``views`` puts V augmented copies of every image in its step. Unaugmented copies
    change nothing (the mean loss, the gradient and BatchNorm's batch statistics of a
    duplicated batch are those of the batch), so without augmentation 2 views train to the
    weights 1 view trains to, labels included; with mirroring the copies differ and so does
    the result, also from 1 mirrored view (so a loop that ignored ``views`` fails here).
    0 views is refused."""
    graph, source = frontend.load(EXAMPLE)
    plan = planner.plan(graph, source, 4, "none")
    x, y = split[0][:240], split[1][:240]

    def weights(**recipe):
        new, report = recover.run(plan, x, y, epochs=1, **recipe)
        assert report["recipe"]["views"] == recipe.get("views", 1)
        return {name: new.graph.constants[name] for name in sorted(new.graph.constants)}

    one, two = weights(augment="none", views=1), weights(augment="none", views=2)
    assert all(np.allclose(one[k], two[k], rtol=1e-4, atol=1e-5) for k in one)
    mirrored, mirrored_once = weights(augment="flip", views=2), weights(augment="flip", views=1)
    assert any(not np.allclose(one[k], mirrored[k], rtol=1e-4, atol=1e-5) for k in one)
    assert any(not np.allclose(mirrored_once[k], mirrored[k], rtol=1e-4, atol=1e-5) for k in one)
    with pytest.raises(LcpcError, match="views 0 must be a whole number from 1"):
        recover.run(plan, x, epochs=1, views=0)


def test_plan_with_cut_weights_needs_the_original_as_teacher(split):
    """A plan whose cross-branch weights an earlier pass zeroed cannot teach itself."""
    from dataclasses import replace

    graph, source = frontend.load(EXAMPLE)
    plan = planner.plan(graph, source, 4, "none")
    constants = dict(graph.constants)
    for n in graph.nodes:
        if n.name in (masks := weight_masks(plan)):
            constants[n.inputs[1]] = constants[n.inputs[1]] * masks[n.name]
    zeroed = replace(plan, graph=replace(graph, constants=constants))
    with pytest.raises(LcpcError, match="already cut"):
        recover.run(zeroed, split[0][:200], epochs=0)
    _, report = recover.run(zeroed, split[0][:400], epochs=1, original=graph)
    assert report["before"]["top1_agreement"] < 0.3 < 0.6 < report["after"]["top1_agreement"]


def test_bad_data_is_refused(split):
    graph, source = frontend.load(EXAMPLE)
    plan = planner.plan(graph, source, 2, "none")
    with pytest.raises(LcpcError, match=r"needs \[N, 1, 8, 8\]"):
        recover.run(plan, np.zeros((10, 3, 8, 8), np.float32))
    with pytest.raises(LcpcError, match="labels must be 10 integers"):
        recover.run(plan, split[0][:10], np.zeros(9, np.int64))


def test_missing_torch_says_how_to_install(no_torch):
    graph, source = frontend.load(EXAMPLE)
    plan = planner.plan(graph, source, 2, "none")
    with pytest.raises(LcpcError, match=r"distillation needs PyTorch: pip install 'lcpc\[train\]'"):
        recover.run(plan, np.zeros((8, 1, 8, 8), np.float32))


def test_recover_cli_end_to_end(split, tmp_path):
    """`lcpc recover --epochs 1`: refit then distillation; the manifest records both stages,
    and the written per-device files compute what the passes measured on the held-out split."""
    import json

    from click.testing import CliRunner

    from lcpc import pipeline
    from lcpc.cli import main
    from lcpc.fidelity import holdout_split

    x = split[0][:600]
    pipeline.convert(EXAMPLE, tmp_path / "cut", 4, "none")
    np.save(tmp_path / "train.npy", x)
    result = CliRunner().invoke(main, ["recover", str(tmp_path / "cut"), "--data", str(tmp_path / "train.npy"),
                                       "--epochs", "1", "-o", str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    assert "refit (held-out" in result.output and "distillation (held-out" in result.output
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())
    figures = manifest["fidelity"]["recovery"]
    assert set(figures) == {"data", "refit", "distillation"}
    assert figures["data"] == {"kind": "real", "samples": 600, "source": "npy",
                               "path": str((tmp_path / "train.npy").resolve())}
    assert "data: real, 600 samples from" in result.output
    refit, distil = figures["refit"], figures["distillation"]
    assert refit["before"]["top1_agreement"] < 0.3 < 0.9 < refit["after"]["top1_agreement"]
    start = distil["stages"]["start"]["heldout"]  # distillation starts where the refit ended
    assert start["top1_agreement"] == refit["after"]["top1_agreement"]
    assert abs(start["kl_divergence"] - refit["after"]["kl_divergence"]) < 1e-5
    assert distil["after"]["top1_agreement"] >= 0.9 and distil["epochs_run"] == 1
    # the lowered plan (per-device ONNX files) equals the recovered graph on the held-out split
    _, held = holdout_split(len(x), 0.1, 0)
    fig = pipeline.verify(tmp_path / "rec", x[held])
    assert fig["top1_agreement"] == distil["after"]["top1_agreement"]
    assert abs(fig["kl_divergence"] - distil["after"]["kl_divergence"]) < 1e-4
