"""The fast sweep path (channels-last, foreach optimiser updates) trains what the reference path trains.

Both run the same protocol and random draws, so they can differ only by float rounding, which training then
amplifies. Not by the same rounding: the channels-last kernels sum BatchNorm's and the convolutions' reductions
over N·H·W in another order, and after six Adam steps their weights lie 1.1-12x as far from a float64 run as the
reference's (measured on every cell; foreach updates are bit-identical to the loop). The test therefore bounds
the two paths' difference by what a different batch order (another seed: a real change of trajectory) makes:
measured 0.000-0.163 of it, asserted < 0.3. A whole sweep on real data: per-stage test accuracies within 3 points
(measured 0.4; binomial noise on 1,000 test images is 1.4 points at 1 sd).
"""

import random

import pytest
import torch

from collectors import data, sweep, zoo
from collectors.config import SweepSpec

CELLS = [(f, d) for f in zoo.FAMILIES for d in ("mnist", "cifar10")]


def _train(family, arch, dataset, split, path, order_seed=1):
    torch.manual_seed(0)
    info = data.DATASETS[dataset]
    model = zoo.build(family, arch, info.channels, info.num_classes)
    init = [p.detach().clone() for p in model.parameters()]
    if path == "fast":
        model.to(memory_format=torch.channels_last)
    opt = sweep._optimizer("adam", model, 1e-3, foreach=path == "fast" or None)
    sweep.train_epochs(model, opt, split, torch.arange(len(split)), dataset, 32, 2, torch.Generator().manual_seed(order_seed),
                       path=path)
    return torch.cat([(p.detach() - p0).flatten().double() for p, p0 in zip(model.parameters(), init, strict=True)])


@pytest.mark.parametrize("family,dataset", CELLS)
def test_the_fast_path_follows_the_reference_over_a_few_steps(family, dataset):
    torch.set_num_threads(1)
    info = data.DATASETS[dataset]
    g = torch.Generator().manual_seed(0)
    split = data.Split(torch.randint(0, 256, (96, info.channels, info.size, info.size), dtype=torch.uint8, generator=g),
                       torch.randint(0, 10, (96,), generator=g))
    arch = zoo.sample_arch(family, random.Random(1))
    ref, fast, other = (_train(family, arch, dataset, split, p, s) for p, s in (("reference", 1), ("fast", 1), ("reference", 2)))
    assert (fast - ref).norm() < 0.3 * (other - ref).norm()


def test_an_unknown_path_is_refused():
    with pytest.raises(ValueError, match="unknown sweep path 'turbo'"):
        sweep.train_stages(torch.nn.Linear(1, 1), None, None, [], [], dataset="mnist", optimizer="adam", batch_size=1,
                           gen=torch.Generator(), path="turbo")


@pytest.mark.realdata
def test_a_whole_fast_sweep_matches_the_reference_within_noise(real_root):
    torch.set_num_threads(1)
    spec = SweepSpec(family="cnn", arch={"depth": 3, "width": 16, "hidden": 64}, dataset="mnist", r=0.5, lr=3e-3,
                     batch_size=64, optimizer="adam", pretrain_epochs=2, n_stages=4, stage_epochs=1, train_size=3000,
                     test_size=1000, seed=0)
    settings = data.DataSettings(str(real_root))
    ref, fast = (sweep.run_sweep(spec, settings, path=p) for p in ("reference", "fast"))
    assert (ref.path, fast.path) == ("reference", "fast") and sweep.to_record(fast)["path"] == "fast"
    accs = [(r.test_acc, f.test_acc) for r, f in zip(ref.stages, fast.stages, strict=True)]
    assert ref.stages[0].test_acc > 0.8  # it learned: the comparison is not between two chance levels
    assert all(abs(r - f) < 0.03 for r, f in accs), accs
    assert all(fast.tensors[k].is_contiguous() for k in fast.tensors)  # snapshots in the standard layout
