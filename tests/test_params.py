import pytest

from dfutils.params import GradCamParams, ParameterError, SplitParams, TrainParams


def test_defaults_are_the_seed_recipe():
    p = TrainParams()
    assert (p.weights, p.trainable, p.image_size, p.lr, p.batch_size) == ("imagenet", "fc", 224,
                                                                         1e-4, 32)


@pytest.mark.parametrize("cls,values,message", [
    (TrainParams, {"bogus": 1}, "unknown parameter 'bogus'"),
    (TrainParams, {"lr": "fast"}, "'lr' must be float"),
    (TrainParams, {"max_epochs": 2.5}, "'max_epochs' must be int"),
    (TrainParams, {"max_epochs": True}, "'max_epochs' must be an integer"),
    (TrainParams, {"trainable": "head"}, "'trainable' must be one of"),
    (TrainParams, {"threshold": 0.5}, "'threshold' must be str"),
    (TrainParams, {"jitter": [0.1, 0.1]}, "jitter must be"),
    (TrainParams, {"jpeg_prob": 1.5}, "jpeg_prob must be a probability"),
    (TrainParams, {"erasing": 2}, "erasing must be a probability"),
    (TrainParams, {"ema": 1.0}, "label_smoothing and ema must be in"),
    (TrainParams, {"label_smoothing": -0.1}, "label_smoothing and ema must be in"),
    (SplitParams, {"val_fraction": 1.0}, "val_fraction must be between 0 and 1"),
    (GradCamParams, {"target": "both"}, "'target' must be one of"),
    (GradCamParams, {"alpha": 2}, "alpha must be between 0 and 1"),
])
def test_bad_values_are_refused_by_name(cls, values, message):
    with pytest.raises(ParameterError, match=message):
        cls.from_mapping(values)


def test_ints_widen_to_floats_and_none_weights_are_allowed():
    p = TrainParams.from_mapping({"lr": 1, "weights": None})
    assert p.lr == 1.0 and isinstance(p.lr, float) and p.weights is None


def test_namespace_rejects_names_papermill_injected_that_the_notebook_lacks():
    namespace = {"raw_dir": "x", "seed": 1, "helper": object(),
                 "In": ["raw_dir = 'x'  # comment", "# Parameters\nseed = 1\nsed = 2\n"]}
    with pytest.raises(ParameterError, match="unknown parameter 'sed'"):
        SplitParams.from_namespace(namespace)


def test_namespace_takes_declared_values_and_ignores_other_globals():
    namespace = {"raw_dir": "x", "seed": 7, "np": object(), "In": ["raw_dir = 'x'"]}
    p = SplitParams.from_namespace(namespace)
    assert (p.raw_dir, p.seed, p.data_dir) == ("x", 7, "data")
