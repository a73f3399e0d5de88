"""The transfer experiment's ceiling, controls, protocol and resumption (issue 13)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from evaluation import inits, stats
from evaluation.config import parse_config
from evaluation.finetune import task_indices
from tests.test_evaluation import BASE, _kinds, _state, _with
from conftest import described, fake_results


def test_oracle_sets_are_supersets_of_d0_and_disjoint_from_the_target_task(settings):
    from collectors import data

    labels = data.load("mnist", settings, True).y
    pool = int(torch.isin(labels, torch.tensor([0, 1, 2, 3, 4])).sum())
    cfg = parse_config(_with(source__train_size=pool // 4, source__oracles=[4, 2]))
    assert cfg.source.oracles == [2, 4]
    for seed in (0, 1):
        d0 = task_indices(cfg.source, labels, True, seed)
        target = set(task_indices(cfg.downstream, labels, True, seed).tolist())
        for m in cfg.source.oracles:
            big = task_indices(cfg.source, labels, True, seed, m)
            assert len(big) == m * len(d0) and set(d0.tolist()) <= set(big.tolist())
            assert not set(big.tolist()) & target and set(labels[big].tolist()) <= {0, 1, 2, 3, 4}
    assert not torch.equal(task_indices(cfg.source, labels, True, 0), task_indices(cfg.source, labels, True, 1))
    from collectors.data import DataError

    with pytest.raises(DataError, match=f"fewer than the {8 * (pool // 4)}"):
        task_indices(cfg.source, labels, True, 0, 8)


@pytest.mark.parametrize("over, needle", [
    ({"source__oracles": [1]}, "multipliers >= 2"),
    ({"source__oracles": [2, 2]}, "distinct"),
    ({"source__train_size": None, "source__oracles": [2]}, "need a source train_size"),
    ({"lr_factors": [0.0]}, "lr_factors"),
    ({"controls": ["shrink"], "shrink_perturb_for": ["known"]}, "shrink_perturb_for"),
])
def test_bad_oracle_and_control_settings_name_the_bad_value(over, needle):
    from collectors.config import ConfigError

    with pytest.raises(ConfigError, match=needle):
        parse_config(_with(**over))


def test_fraction_of_the_oracle_gap_closed_matches_a_hand_computed_case():
    # per pair: naive 0.50, oracle 0.70 (gap 0.20); init lifts 0.04, 0.06, 0.05 -> mean 0.05 -> 0.25 closed
    naive, oracle, init = [0.50, 0.50, 0.50], [0.70, 0.70, 0.70], [0.54, 0.56, 0.55]
    f, lo, hi = stats.gap_closed(init, naive, oracle)
    assert f == pytest.approx(0.25)
    # resampling 3 pairs, the lift's mean lies in [0.04, 0.06]: the interval sits inside [0.20, 0.30]
    assert 0.2 - 1e-9 <= lo < 0.25 < hi <= 0.3 + 1e-9
    # the design is kept: with two clusters every resample holds the same number of pairs of each
    f2, lo2, hi2 = stats.gap_closed(init + init, naive * 2, oracle * 2, clusters=[0, 0, 0, 1, 1, 1])
    assert f2 == pytest.approx(0.25) and lo2 >= 0.2 - 1e-9 and hi2 <= 0.3 + 1e-9
    # pre-trained models are a random draw too: one closes nothing, one half the gap, each without spread
    # inside; resampling pairs only would give a zero-width interval, resampling the models does not
    f3, lo3, hi3 = stats.gap_closed([0.50] * 3 + [0.60] * 3, [0.5] * 6, [0.7] * 6, clusters=[0, 0, 0, 1, 1, 1])
    assert f3 == pytest.approx(0.25) and lo3 == pytest.approx(0.0) and hi3 == pytest.approx(0.5)
    f4, lo4, hi4 = stats.gap_closed([0.50, 0.50, 0.50, 0.60, 0.60, 0.60, 0.55, 0.55], [0.5] * 8, [0.7] * 8,
                                    clusters=[0, 0, 0, 1, 1, 1, 2, 2])  # clusters of unequal size
    assert lo4 == pytest.approx(0.0) and hi4 == pytest.approx(0.5) and 0.0 < f4 < 0.5
    assert stats.gap_closed([0.5, 0.6], [0.5, 0.5], [0.5, 0.5])[0] != stats.gap_closed([0.5, 0.6], [0.5, 0.5], [0.5, 0.5])[0]  # nan: no gap
    with pytest.raises(ValueError, match="at least 2 pairs"):
        stats.gap_closed([0.5], [0.5], [0.6])


def test_oracle_gaps_pair_each_prediction_with_the_oracle_of_its_multiplier():
    from evaluation.summary import oracle_gaps, verdicts

    lift = {"naive": 0.0, "oracle-x2": 0.04, "known-1": 0.01, "known-2": 0.03}
    descs = described(*lift)
    results = fake_results(lift, (0, 1), range(4), lambda i, p, s: (0.001 * s, 0.002 * s * (i != "naive")))
    gaps = oracle_gaps(results, descs)
    assert [(g["oracle"], g["phase"]) for g in gaps] == [("oracle-x2", "head"), ("oracle-x2", "full")]
    head = gaps[0]
    assert head["gap"] == pytest.approx(0.04) and set(head["closed"]) == {"known-1"}  # known-2 claims ×4: no oracle
    assert head["closed"]["known-1"]["fraction"] == pytest.approx(0.25)
    lines = verdicts([], [], {}, 100, gaps)
    assert any(line.startswith("ceiling ×2 (head-only)") and "known-1: +0.25" in line for line in lines)

    from evaluation import report, summary

    rows, comps = summary.summarize(results, descs, {})
    curves = {"0": {"bn_reestimated": [0.9, 0.8]}}
    line = report.overview_row("x", _with(methods=["known"]), {"rows": rows, "comparisons": comps, "gaps": gaps, "curves": curves})
    full = gaps[1]
    want = (f"{100 * full['gap']:+.2f} [{100 * full['gap_ci_low']:+.2f}, {100 * full['gap_ci_high']:+.2f}]; "
            f"known-1 closes {full['closed']['known-1']['fraction']:+.2f}")
    assert f"| 90.0 → 80.0 | {want}" in line


def test_pure_and_fixed_shrink_controls():
    th0 = _state(0)
    pred = {k: (0.9 * v if _kinds()[k] in ("conv", "linear", "bias") else v + 1) for k, v in th0.items()}
    noisy = {k: v + 0.01 * torch.randn_like(v) for k, v in pred.items()}
    s = inits.shrink(th0, noisy, _kinds())
    for k, kind in _kinds().items():
        if kind in ("conv", "linear", "bias"):
            ratio = s[k] / th0[k]
            assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio)), k  # a pure shrink: no noise, no direction
            assert abs(float(ratio.flatten()[0]) - 0.9) < 0.02
        else:
            assert torch.equal(s[k], th0[k])  # BatchNorm and buffers stay Θ0's
    fixed = inits.scaled(th0, _kinds(), 0.64)
    assert torch.allclose(fixed["c.weight"], 0.64 * th0["c.weight"]) and torch.equal(fixed["bn.weight"], th0["bn.weight"])


def test_controls_change_only_what_they_say(tmp_path):
    from evaluation import inits, trajectories

    cfg = parse_config(_with(steps=2, controls=["bn-reset", "lr", "shrink-fixed", "shrink"], lr_factors=[1.5, 2.0]))
    stages = [_state(k) for k in range(5)]
    traj = trajectories.Trajectory(stages, _kinds(), "cnn", {}, cfg.source, 0.5, 10, oracles={2: _state(9)})
    got, _, _ = inits.build_inits(cfg, traj, {})
    assert got["naive-bnreset"].finetune == {"bn": "reset"} and got["naive-bnreset"].state is stages[0]
    assert got["naive-lr2"].finetune == {"full_lr": 2 * cfg.downstream.full_lr}
    assert cfg.downstream.model_copy(update=got["naive-lr1.5"].finetune).full_lr == pytest.approx(1.5e-3)
    assert got["scaled-2"].desc == {"method": "scaled", "lambda": 0.64, "step": 2, "multiplier": 4.0}
    assert got["oracle-x2"].desc["multiplier"] == 2 and got["oracle-x2"].state["c.weight"].equal(_state(9)["c.weight"])
    assert {"shrink-taskvector-1", "shrink-taskvector-2"} <= set(got) and "sp-taskvector-1" not in got


def test_the_released_scripts_controls_and_bn_at_init(tmp_path):
    """BN at its initial values for the predictions (and their matched controls) and for naive-bninit, the last
    stage and the converged Θ0 as naive-like controls; conv and linear weights are never touched."""
    import torch

    from collectors import zoo
    from evaluation import inits, trajectories

    arch = {"depth": 2, "width": 4, "hidden": 8}
    cfg = parse_config(_with(steps=1, controls=["bn-init", "last", "converged", "shrink"], predicted_bn="init",
                             source__arch=arch, source__converged_epochs=3))
    model = zoo.build("cnn", arch, 1, 5)
    kinds = zoo.tensor_kinds(model)
    torch.manual_seed(7)
    stages = [{n: t + 0.1 * (k + 1) if t.is_floating_point() else t + k + 1 for n, t in model.state_dict().items()}
              for k in range(5)]
    traj = trajectories.Trajectory(stages, kinds, "cnn", arch, cfg.source, 0.5, 10, converged=stages[2])
    got, _, _ = inits.build_inits(cfg, traj, {})
    assert got["naive-last"].state is stages[-1] and got["naive-converged"].state is stages[2]
    fresh = model.state_dict()
    for name in ("naive-bninit", "taskvector-1", "shrink-taskvector-1"):
        st = got[name].state
        for n, kind in kinds.items():
            if kind in ("norm", "buffer"):
                assert torch.equal(st[n], fresh[n]), (name, n)  # γ = 1, β = 0, running mean 0, var 1
            elif name == "naive-bninit":
                assert torch.equal(st[n], stages[0][n])
    assert not torch.equal(got["taskvector-1"].state["0.weight"], fresh["0.weight"])  # the predicted kernel stays
    from collectors.config import ConfigError

    with pytest.raises(ConfigError, match="converged_epochs"):
        parse_config(_with(controls=["converged"]))


def test_protocol_mismatch_with_the_known_under_test_is_reported():
    from evaluation import trajectories

    ours, note = trajectories.protocol_check(parse_config(_with(methods=["known"], shrink_perturb_for=[])))
    assert ours["schedule"] == "cosine Θ0, constant stages" and ours["stage_epochs"] == "pretrain"
    assert note.startswith("protocol MISMATCH") and "schedule: here cosine Θ0, constant stages, meta-training cosine" in note
    same = _with(methods=["known"], shrink_perturb_for=[], source__stage_cosine=True)
    assert trajectories.protocol_check(parse_config(same))[1].startswith("protocol: the evaluation sweep follows")
    assert trajectories.protocol_check(parse_config(BASE))[1] is None  # no KNOWN under test: nothing to match


def test_report_module_imports_without_torch():
    code = "import sys, evaluation.report, evaluation.summary; bad = [m for m in ('torch', 'ray', 'collectors') if m in sys.modules]; sys.exit(str(bad) if bad else 0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr


def _children(uri):
    from mlflow import MlflowClient

    from evaluation.summary import EXPERIMENT, ROLE_TAG

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return [], []
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    return ([r for r in runs if r.data.tags.get(ROLE_TAG) == "experiment"],
            [r for r in runs if r.data.tags.get(ROLE_TAG) == "finetune"])


@pytest.mark.ray
def test_a_killed_experiment_resumes_losing_nothing_finished_and_duplicating_nothing(tmp_path, fake_root):
    """SIGKILL the whole experiment once some fine-tunes are logged; the same command continues the same parent
    run, keeps every finished child (same run ids), runs only the rest, and logs no pair twice."""
    cfg = tmp_path / "tiny.yaml"
    raw = _with(downstream__seeds=3, downstream__full_epochs=3, controls=["lr"], lr_factors=[2.0], methods=["taskvector"],
                source__train_size=50, source__oracles=[2])
    cfg.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "evaluation.transfer", "--config", str(cfg), "--data-root", str(fake_root),
           "--tracking-uri", uri, "--workers", "1"]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    root = Path(__file__).parents[1]
    proc = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len([c for c in _children(uri)[1] if c.info.status == "FINISHED"]) >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the experiment finished before it could be killed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {c.info.run_id for c in _children(uri)[1] if c.info.status == "FINISHED"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming MLflow run" in done.stdout
    parents, children = _children(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    finished = [c for c in children if c.info.status == "FINISHED"]
    keys = [(c.data.params["init"], c.data.params["pretrain_seed"], c.data.params["seed"]) for c in finished]
    # scratch, naive, oracle-x2, taskvector-1, naive-lr2 × 3 seeds
    assert len(keys) == len(set(keys)) == 5 * 3 == len(children)
    assert before <= {c.info.run_id for c in finished}  # what finished before the kill was kept, not rerun
    summary = json.loads(Path(parents[0].info.artifact_uri.removeprefix("file://"), "summary.json").read_text())
    assert all(r["n"] == 3 for r in summary["rows"]) and [g["oracle"] for g in summary["gaps"]] == ["oracle-x2"] * 2


def test_the_shipped_protocol_is_read_from_the_catalog_rows():
    from known.registry import protocol_of

    row = {"stage_init": "sequential", "schedule": "cosine", "optimizer_state": "fresh", "augment": "none",
           "stage_epochs": 10, "pretrain_epochs": 10}
    assert protocol_of([row]) == {"stage_init": "sequential", "schedule": "cosine", "optimizer_state": "fresh",
                                  "augment": "none", "weight_decay": 0.0, "theta0": "epochs", "stage_epochs": "pretrain",
                                  "pretrain_epochs": 10}
    mixed = protocol_of([row, {**row, "schedule": None, "stage_epochs": 2, "r": 0.5}, {**row, "r": 0.8}])
    assert mixed["schedule"] == ["constant", "cosine"] and mixed["stage_epochs"] == [2, "pretrain"]  # None: legacy
    assert mixed["r"] == [0.5, 0.8]


def test_protocol_check_compares_the_scale_too():
    """|D0|, Θ0's epochs, r and the rate: a value must match, a sampled range must contain the evaluation's."""
    from evaluation.config import protocol_diff

    ours = {"stage_init": "sequential", "stage_epochs": "pretrain", "schedule": "cosine", "optimizer_state": "fresh",
            "augment": "none", "weight_decay": 0.0, "theta0": "epochs", "train_size": 6250, "pretrain_epochs": 15,
            "r": 0.5, "lr": 2e-3}
    theirs = {**{k: ours[k] for k in ("stage_init", "stage_epochs", "schedule", "optimizer_state", "augment")},
              "train_size": 2000, "pretrain_epochs": 10, "r": [0.5, 0.8], "lr": [3e-4, 3e-3]}
    diff, unknown = protocol_diff(ours, theirs)
    assert diff == {"train_size": (6250, 2000), "pretrain_epochs": (15, 10)} and unknown == []
    assert protocol_diff({**ours, "r": 0.4}, theirs)[0]["r"] == (0.4, [0.5, 0.8])
    old = {k: ours[k] for k in ("stage_init", "stage_epochs", "schedule", "optimizer_state", "augment")}
    assert protocol_diff(ours, old) == ({}, ["train_size", "pretrain_epochs", "r", "lr"])  # older provenance


@pytest.mark.parametrize("trains_bn", [False, True])
def test_the_head_phase_trains_batchnorm_only_when_asked(settings, monkeypatch, trains_bn):
    """The released scripts' first phase trains the head *and* BatchNorm (in training mode); ours only the head."""
    from collectors import zoo
    from evaluation import finetune as ft
    from evaluation.config import Downstream

    arch = {"depth": 2, "width": 4, "hidden": 8}
    task = Downstream(dataset="mnist", classes=[5, 6, 7, 8, 9], train_size=40, test_size=20, head_epochs=2,
                      full_epochs=0, seeds=2, bn="keep", head_trains_bn=trains_bn)
    init = zoo.build("cnn", arch, 1, 5).state_dict()
    seen = []
    original = ft.evaluate
    monkeypatch.setattr(ft, "evaluate", lambda model, *a, **k: (seen.append({n: t.clone() for n, t in model.state_dict().items()}),
                                                                 original(model, *a, **k))[1])
    ft.finetune(init, "cnn", arch, task, settings, seed=0)
    after_head = seen[0]
    assert torch.equal(after_head["0.weight"], init["0.weight"])  # the kernels stay frozen either way
    moved = not torch.equal(after_head["1.weight"], init["1.weight"]) and not torch.equal(after_head["1.running_mean"], init["1.running_mean"])
    assert moved == trains_bn


@pytest.mark.ray
def test_fine_tunes_follow_the_collectors_failure_policy(tmp_path, ray_local, monkeypatch):
    """A dead worker's fine-tune is retried (and answers); one whose own code raises fails at once, once, and
    is named — the others still reach on_result."""
    from evaluation import runner
    from evaluation.inits import Init

    cfg = parse_config(BASE)
    traj = type("T", (), {"family": "cnn", "arch": {}})()
    jobs = [runner.Job(("naive", 0, seed), Init({"method": "naive", "step": 0}, None), traj) for seed in (11, 12, 13)]
    marker = str(tmp_path / "died")

    def dies_once_then_answers(init, family, arch, task_json, settings, seed, path, tuning_json):
        import os  # self-contained: Ray ships this function by value

        if seed == 13:
            raise ValueError("a bug in fine-tuning code")
        if not os.path.exists(f"{marker}-{seed}"):
            open(f"{marker}-{seed}", "w").close()
            os._exit(1)  # the worker process dies
        return {"acc_head": 0.5, "acc_full": 0.6, "wall_s": 0.0}

    monkeypatch.setattr(runner, "_finetune_job", dies_once_then_answers)
    got = []
    with pytest.raises(runner.FinetuneError, match=r"1 of 3 fine-tunes failed:\n  \('naive', 0, 13\): ValueError: a bug"):
        runner.run_finetunes(jobs, cfg, None, 2, got.append)
    assert sorted(r["seed"] for r in got) == [11, 12]  # each died once, was retried, and answered
    assert not (tmp_path / "died-13").exists()  # the raising one was never retried
