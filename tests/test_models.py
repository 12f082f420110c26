import pytest
import torch

import paam_fast as pf

# He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M (option A shortcuts).
COUNTS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
          "resnet110": 1_727_962}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_cifar_resnet_parameter_counts(name):
    m = pf.models.get_model(name)
    assert sum(p.numel() for p in m.parameters()) == COUNTS[name]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown arch 'resnet7'"):
        pf.models.get_model("resnet7")
