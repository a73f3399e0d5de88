"""The fast sweep path (channels-last, foreach optimiser updates) trains what the reference path trains.

Both run the same protocol and random draws, so they can differ only by float rounding, which training then
amplifies. Not by the same rounding: the channels-last kernels sum BatchNorm's and the convolutions' reductions
over N·H·W in another order, and after six Adam steps their weights lie 1.1-12x as far from a float64 run as the
reference's (measured on every cell; foreach updates are bit-identical to the loop). The test therefore bounds
the two paths' difference by what a different batch order (another seed: a real change of trajectory) makes:
measured 0.000-0.163 of it, asserted < 0.3. A whole sweep on real data, each stage cosine-annealed: per-stage
test accuracies within 3 points (measured ≤ 1.6 over 3 seeds on an AVX-512 EPYC, where the CNN's paths are not
bit-identical; binomial noise on 1,000 test images is 1.4 points at 1 sd). At a constant rate of 3e-3 that sweep is
chaotic — scaling the initial weights by 1 + 1e-6·N(0, 1) moves a stage's accuracy by up to 12 points — so no
bound between two roundings holds there.
"""

import platform
import random
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from torch.utils._python_dispatch import TorchDispatchMode

from collectors import data, fastpath, sweep, zoo
from collectors.config import SweepSpec

CELLS = [(f, d) for f in zoo.FAMILIES for d in ("mnist", "cifar10")]


def _train(family, arch, dataset, split, path, order_seed=1):
    torch.manual_seed(0)
    info = data.DATASETS[dataset]
    model = zoo.build(family, arch, info.channels, info.num_classes)
    init = [p.detach().clone() for p in model.parameters()]
    sweep.for_path(model, path, dataset, split.x)
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
    spec = SweepSpec(family="cnn", arch={"depth": 3, "width": 16, "hidden": 64}, dataset="mnist", r=0.5, lr=1e-3,
                     batch_size=64, optimizer="adam", pretrain_epochs=2, n_stages=4, stage_epochs=1, train_size=3000,
                     test_size=1000, schedule="cosine", seed=0)
    settings = data.DataSettings(str(real_root))
    ref, fast = (sweep.run_sweep(spec, settings, path=p) for p in ("reference", "fast"))
    assert (ref.path, fast.path) == ("reference", "fast") and sweep.to_record(fast)["path"] == "fast"
    accs = [(r.test_acc, f.test_acc) for r, f in zip(ref.stages, fast.stages, strict=True)]
    # it learned (chance is 0.1; Θ0 tests 0.80 after its 2 annealed epochs): the comparison is not between two chance levels
    assert ref.stages[0].test_acc > 0.5
    assert all(abs(r - f) < 0.03 for r, f in accs), accs
    assert all(fast.tensors[k].is_contiguous() for k in fast.tensors)  # snapshots in the standard layout


def _mixed_layout_backward_ops(model, x, y) -> list[str]:
    """The backward ops of one step on ``model`` that meet one 4-D tensor channels-last and another NCHW (the
    slow strided kernels ``collectors.fastpath`` mends)."""
    def layout(t):
        if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2] * t.shape[3] > 1:
            return "cl" if t.is_contiguous(memory_format=torch.channels_last) else "nchw" if t.is_contiguous() else None
        return None

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if {"cl", "nchw"} <= {layout(a) for a in args}:
                mixed.append(func.__name__)
            return func(*args, **(kwargs or {}))

    mixed: list[str] = []
    loss = torch.nn.functional.cross_entropy(model(x), y)
    with Log():
        loss.backward()
    return mixed


def test_the_fast_path_hands_the_last_feature_map_a_channels_last_gradient():
    torch.manual_seed(0)
    arch = {"width_mult": 0.25, "repeats": [1, 1, 1, 1]}
    x, y = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (8,))
    plain = zoo.build("mobilenet", arch, 1, 10).to(memory_format=torch.channels_last)
    mended = sweep.for_path(zoo.build("mobilenet", arch, 1, 10), "fast", "mnist", x)
    inputs = sweep._inputs("mnist", x, "fast")
    # MobileNet's global pooling returns an NCHW gradient to its last ReLU6 and BatchNorm (80 ms instead of 7)
    assert {"hardtanh_backward.default", "native_batch_norm_backward.default"} <= set(_mixed_layout_backward_ops(plain, inputs, y))
    assert _mixed_layout_backward_ops(mended, inputs, y) == []


def test_preparing_the_fast_path_changes_no_state_and_happens_once():
    torch.manual_seed(0)
    model = zoo.build("cnn", {"depth": 2, "width": 8, "hidden": 16}, 1, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    rng = torch.get_rng_state()
    for _ in range(2):
        sweep.for_path(model, "fast", "mnist", x)
    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics included
    last = fastpath.last_feature_map(model, sweep._inputs("mnist", x, "fast"))
    assert isinstance(last, torch.nn.MaxPool2d) and len(last._forward_hooks) == 1


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33),
                    reason="the allocator tuning is glibc's mallopt; its count (mallinfo2) needs glibc 2.33")
def test_the_fast_path_allocator_keeps_freed_memory_in_the_heap():
    """A 30 MB tensor: untuned glibc maps it from the kernel and unmaps it when freed (each step then faults it in
    again); tuned, it comes from the heap and stays there once freed. Read from glibc's own counts (mallinfo2), not
    from page faults, which sandboxes may not count (CI reported 0 for both). One large block rather than many 1 MB
    ones: how much of those untuned glibc kept depended on what the process had freed before (5 or 107 of 100 MB)."""
    code = ("import ctypes, ctypes.util, sys, torch\nfrom collectors import fastpath\n"
            "class Info(ctypes.Structure):\n    _fields_ = [(n, ctypes.c_size_t) for n in "
            "'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]\n"
            "libc = ctypes.CDLL(ctypes.util.find_library('c'))\nlibc.mallinfo2.restype = Info\n"
            "assert sys.argv[1] == '0' or fastpath.keep_freed_memory()\n"
            "mapped = libc.mallinfo2().hblkhd\nbig = torch.ones(7_500_000)\nmapped = libc.mallinfo2().hblkhd - mapped\n"
            "del big\nprint(mapped, libc.mallinfo2().fordblks)")
    mapped, free_in_heap = {}, {}
    for t in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, t], capture_output=True, text=True, check=True, cwd=REPO).stdout
        mapped[t], free_in_heap[t] = map(int, out.split())
    assert mapped["0"] >= 30_000_000 and mapped["1"] == 0, mapped  # untuned: from the kernel; tuned: from the heap
    assert free_in_heap["1"] >= 30_000_000, free_in_heap  # and, freed, it stays in the heap
