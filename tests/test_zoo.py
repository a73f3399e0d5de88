import random

import pytest
import torch

from collectors import zoo


@pytest.mark.parametrize("family", sorted(zoo.FAMILIES))
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_every_family_builds_under_3m_params_for_both_input_shapes(family, channels, size):
    sizes = []
    for seed in range(40):
        arch = zoo.sample_arch(family, random.Random(seed))
        model = zoo.build(family, arch, channels, 10)  # raises above the limit
        sizes.append(zoo.n_params(model))
    assert max(sizes) < zoo.MAX_PARAMS and len(set(sizes)) > 3  # sizes really vary
    model.eval()
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)


@pytest.mark.parametrize("family", sorted(zoo.FAMILIES))
def test_every_state_dict_entry_has_a_kind(family):
    model = zoo.build(family, zoo.sample_arch(family, random.Random(0)), 3, 10)
    kinds = zoo.tensor_kinds(model)
    assert set(kinds) == set(model.state_dict())
    assert {"conv", "linear", "bias", "norm", "buffer"} <= set(kinds.values())
    assert all(kinds[k] == "buffer" for k in kinds if "running_" in k or "num_batches" in k)


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="'vgg'"):
        zoo.sample_arch("vgg", random.Random(0))
