"""The census counts encoder modules by class or by encoder-shaped weights, not by namespace alone."""

import torch

from dit_workers.census import encoder_census

HF_NAMESPACE = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
ENCODER_SHAPES = {(48, 16), (16, 48)}


def _module_class(name: str, namespace: str, shape: tuple[int, ...] | None = None, buffer: bool = False):
    def __init__(self):
        torch.nn.Module.__init__(self)
        if shape is not None and buffer:
            self.register_buffer("table", torch.randn(shape))
        elif shape is not None:
            self.weight = torch.nn.Parameter(torch.randn(shape))

    return type(name, (torch.nn.Module,), {"__init__": __init__, "__module__": namespace})


def _census_of(module: torch.nn.Module) -> list[str]:
    return encoder_census(ENCODER_SHAPES, pipeline_modules=[])["encoder_modules"]


def test_a_parameter_free_wrapper_from_the_encoder_namespace_is_not_an_encoder():
    # transformers >= 5.25 with `kernels` installed wraps apply_rotary_pos_emb in such a module.
    func = _module_class("Func", HF_NAMESPACE)()
    assert f"{HF_NAMESPACE}.Func" not in _census_of(func)
    del func


def test_a_module_of_the_encoder_namespace_holding_encoder_weights_is_counted():
    holder = _module_class("Projector", HF_NAMESPACE, (48, 16))()
    assert f"{HF_NAMESPACE}.Projector" in _census_of(holder)
    table = _module_class("Table", "workers.model.anything", (16, 48), buffer=True)()
    assert "workers.model.anything.Table" in _census_of(table)
    del holder, table


def test_an_encoder_class_is_counted_whatever_it_holds_and_other_shapes_are_not():
    encoder_class = _module_class("Qwen2_5_VLRotaryEmbedding", "somewhere.else")()
    other_shape = _module_class("Projector2", HF_NAMESPACE, (7, 5))()
    found = _census_of(encoder_class)
    assert "somewhere.else.Qwen2_5_VLRotaryEmbedding" in found
    assert f"{HF_NAMESPACE}.Projector2" not in found
    del encoder_class, other_shape
