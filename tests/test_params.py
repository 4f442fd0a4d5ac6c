"""Parameters are defined once, in dfutils.params: every other place is checked against it."""

import json
import types

import nbformat
import pytest

from dfutils import archs, cam, notebooks, params
from dfutils.notebooks import validated
from dfutils.params import GradCamParams, ParameterError, SplitParams, TrainParams
from dfutils.paths import REPO_ROOT
from dfutils.pipeline import STEPS, load_params, plan

STEP_PARAMS = [step.params for step in STEPS.values()]


def test_defaults_are_the_original_recipe():
    p = TrainParams()
    assert (p.weights, p.trainable, p.image_size, p.lr, p.batch_size) == ("imagenet", "head",
                                                                         224, 1e-4, 32)


@pytest.mark.parametrize("cls,values,message", [
    (TrainParams, {"bogus": 1}, "unknown parameter 'bogus'"),
    (TrainParams, {"lr": "fast"}, "'lr' must be float"),
    (TrainParams, {"max_epochs": 2.5}, "'max_epochs' must be int"),
    (TrainParams, {"max_epochs": True}, "'max_epochs' must be an integer"),
    (TrainParams, {"trainable": "layer3"},
     "trainable must be one of head, norm, last, last:k, all"),
    (TrainParams, {"threshold": 0.5}, "'threshold' must be one of"),  # typed: no coercion
    (TrainParams, {"jitter": [0.1, 0.1]}, "jitter must be"),
    (TrainParams, {"jpeg_prob": 1.5}, "jpeg_prob must be a probability"),
    (TrainParams, {"erasing": 2}, "erasing must be a probability"),
    (TrainParams, {"ema": 1.0}, "label_smoothing and ema must be in"),
    (TrainParams, {"label_smoothing": -0.1}, "label_smoothing and ema must be in"),
    (SplitParams, {"val_fraction": 1.0}, "val_fraction must be between 0 and 1"),
    (GradCamParams, {"target": "both"}, "'target' must be one of"),
    (GradCamParams, {"layer": "layer1"}, "'layer' must be one of"),
    (GradCamParams, {"alpha": 2}, "alpha must be between 0 and 1"),
])
def test_bad_values_are_refused_by_name(cls, values, message):
    with pytest.raises(ParameterError, match=message):
        cls.from_mapping(values)


def test_ints_widen_to_floats_and_none_weights_are_allowed():
    p = TrainParams.from_mapping({"lr": 1, "weights": None})
    assert p.lr == 1.0 and isinstance(p.lr, float) and p.weights is None


@pytest.mark.parametrize("name,given,expected", [
    ("lr", "3e-4", 3e-4), ("max_epochs", "5", 5), ("flip", "false", False),
    ("flip", "YES", True), ("weights", "None", None), ("weights", "null", None),
    ("weights", "w.pth", "w.pth"), ("jitter", "[0.1, 0, 0, 0]", [0.1, 0.0, 0.0, 0.0]),
    ("threshold", 0.5, "0.5"), ("threshold", "eer", "eer"), ("lr", 1, 1.0),
    ("data_dir", "none", "none"),  # only a parameter that may be None becomes None
])
def test_one_coercion_path_for_strings_and_yaml_values(name, given, expected):
    value = TrainParams.from_mapping(TrainParams.coerce({name: given})).to_dict()[name]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("name,given,message", [
    ("flip", "maybe", "takes true or false"), ("max_epochs", "2.5", "takes an integer"),
    ("lr", "fast", "takes a number"), ("jitter", "[0.1,", "takes a JSON list"),
])
def test_coercion_errors_name_the_parameter(name, given, message):
    with pytest.raises(ParameterError, match=f"'{name}' {message}"):
        TrainParams.coerce({name: given})


def test_load_params_passes_other_notebooks_keys_over_and_refuses_unknown_ones(tmp_path):
    file = tmp_path / "p.yaml"
    file.write_text("lr: 0.01\nn_images: 4\nthreshold: 0.5\n")
    p = load_params(TrainParams, str(file), {"max_epochs": "3", "lr": "0.02"})
    assert (p.lr, p.max_epochs, p.threshold) == (0.02, 3, "0.5")
    with pytest.raises(ParameterError, match="unknown parameter 'epoch'"):
        load_params(TrainParams, None, {"epoch": "3"})


def _namespace(*items):
    """A notebook's globals in the order they were assigned."""
    return dict(items)


def test_namespace_refuses_a_value_papermill_injected_for_an_unknown_name():
    ns = _namespace(("In", []), ("_ih", []), ("raw_dir", "x"), ("data_dir", "d"),
                    ("val_fraction", 0.2), ("seed", 1), ("overwrite", False),
                    ("sed", 2), ("_i3", "..."), ("np", types.ModuleType("numpy")))
    with pytest.raises(ParameterError, match="unknown parameter 'sed'"):
        validated(SplitParams, ns)


def test_namespace_ignores_what_the_notebook_defined_after_its_imports():
    ns = _namespace(("raw_dir", "x"), ("seed", 7), ("np", types.ModuleType("numpy")),
                    ("label", 1), ("rows", [1, 2]))  # a re-run in JupyterLab: later cells' names
    p = validated(SplitParams, ns)
    assert (p.raw_dir, p.seed, p.data_dir) == ("x", 7, "data")


def test_namespace_coerces_like_the_runner():
    ns = _namespace(("threshold", 0.5), ("lr", 1), ("np", types.ModuleType("numpy")))
    p = validated(TrainParams, ns)
    assert (p.threshold, p.lr) == ("0.5", 1.0)


@pytest.mark.parametrize("cls", STEP_PARAMS)
def test_each_notebooks_parameters_cell_is_its_class(cls):
    notebook = REPO_ROOT / "notebooks" / f"{cls.step}.ipynb"
    assert notebooks.check_notebooks([notebook], STEPS) == []
    cell = next(c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code")
    assert [(n, v) for n, v, _ in notebooks.read_parameters_cell(cell.source)] == list(
        cls.defaults().items())


@pytest.mark.parametrize("change,message", [
    (lambda s: s.replace("seed = 42", "seed = 43"), "seed = 43 but SplitParams's default is 42"),
    (lambda s: s.replace("val_fraction = 0.2", "val_fraction = 0.25"), "val_fraction"),
    (lambda s: s + '\nextra = 1  # not in the class', "extra ['extra']"),
    (lambda s: "\n".join(x for x in s.splitlines() if not x.startswith("seed")),
     "missing ['seed']"),
    (lambda s: s.replace("validation share", "share"), "the comment of val_fraction"),
])
def test_check_notebooks_finds_a_drift_from_the_class_and_fix_repairs_it(tmp_path, change,
                                                                        message):
    notebook = tmp_path / "01-split.ipynb"
    nb = nbformat.read(REPO_ROOT / "notebooks/01-split.ipynb", as_version=4)
    nb.cells[1].source = change(nb.cells[1].source)
    nbformat.write(nb, notebook)
    (problem,) = notebooks.check_notebooks([notebook], STEPS)
    assert message in problem
    assert notebooks.check_notebooks([notebook], STEPS, fix=True) == []
    assert notebooks.check_notebooks([notebook], STEPS) == []


def test_the_parameter_reference_is_generated_from_the_classes():
    page = (REPO_ROOT / "docs" / "parameters.md").read_text()
    begin, end = "<!-- parameters: python -m dfutils params -->\n", "<!-- end of parameters -->"
    assert begin in page and end in page
    assert page.split(begin, 1)[1].split(end, 1)[0].strip() == notebooks.reference(
        STEP_PARAMS).strip()


@pytest.mark.parametrize("name", list(archs.ARCHS))
def test_every_architecture_defines_every_option(name):
    entry = archs.get(name)
    for trainable in ("head", "norm", "last", "all", "fc", "layer4",
                      f"last:{len(entry.blocks)}"):
        assert entry.check_trainable(trainable) == "", trainable
        TrainParams(arch=name, trainable=trainable, weights=None)
    for wrong in ("last:0", f"last:{len(entry.blocks) + 1}", "last:x", "layer3", "blocks"):
        with pytest.raises(ParameterError, match=f"trainable must be one of .*{name}"):
            TrainParams(arch=name, trainable=wrong, weights=None)
    assert tuple(entry.cam_layers) == archs.CAM_LAYERS
    assert entry.published.kind in archs.PRETRAINED


def test_every_option_is_the_same_set_everywhere():
    assert params.choices(params.CamTarget) == cam.TARGETS
    assert params.choices(params.CamLayer) == ("auto", *archs.CAM_LAYERS)
    assert params.choices(params.Dataset) == tuple(__import__("dfutils.datasets").datasets.READERS)
    parser = __import__("dfutils.__main__", fromlist=["build_parser"]).build_parser()
    predict = parser._subparsers._group_actions[0].choices["predict"]
    layer = next(a for a in predict._actions if a.dest == "layer")
    assert f"(one of {', '.join(map(json.dumps, params.choices(params.CamLayer)))})" in (
        layer.help)


@pytest.mark.parametrize("cls,name,old,new", [
    (TrainParams, "trainable", "fc", "head"), (TrainParams, "trainable", "layer4", "last"),
    (GradCamParams, "layer", "layer3", "last-1"), (GradCamParams, "layer", "layer2", "last-2")])
def test_the_names_of_earlier_versions_stay_accepted(cls, name, old, new):
    assert getattr(cls.from_mapping({name: old}), name) == new
    assert cls.current({name: old}) == {name: new}


@pytest.mark.parametrize("values,message", [
    ({"fakes": "data", "sbi_share": 0.3}, 'sbi_share applies to fakes="sbi\\+data" only'),
    ({"fakes": "sbi+data", "sbi_share": 0.0}, 'one family of fakes only: use fakes="data"'),
    ({"fakes": "sbi+data", "sbi_share": 1.0}, 'one family of fakes only: use fakes="sbi"')])
def test_a_share_with_no_effect_is_refused(values, message):
    """Issue 36, item 12: SBI_SHARE with FAKES=data, or 0 with sbi+data, was accepted."""
    with pytest.raises(ParameterError, match=message):
        TrainParams.from_mapping(values)


def test_a_value_for_a_step_the_chain_does_not_run_is_refused(tmp_path):
    """Issue 36, item 12: ARCH= on a chain that only explains a trained run had no effect."""
    from dfutils.pipeline import ChainError, plan

    with pytest.raises(ChainError, match="ARCH= is a parameter of 02-train, which this chain "
                                         "does not run \\(03-gradcam\\)"):
        plan(None, {"arch": "resnet50"}, ["03-gradcam"], "runs/x", False)
    assert plan(None, {"layer": "last"}, ["03-gradcam"], "runs/x", False)["03-gradcam"][
        "layer"] == "last"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "notebooks" / "params").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_every_parameter_file_is_valid_for_every_step(path):
    """A recipe that does not validate would fail only when someone runs it; each pretrained
    one names the file its weights come in."""
    steps = [s for s in STEPS if s not in ("04-evaluate", "05-benchmark")]  # asked by name
    planned = plan(str(path), {}, steps, "runs/check", False)
    train = TrainParams.from_mapping(planned["02-train"])
    if train.weights in archs.PRETRAINED:
        assert archs.get(train.arch).published.file in path.read_text()
