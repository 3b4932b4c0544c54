"""`spnet submit` / `spnet jobs` against a real SLURM (cluster/slurm.sh: slurmctld + slurmd n1, n2 on this host).

Fast tests (no cluster): the --dry-run script, profile and sweep handling, bad input. The SLURM tests train
resnet_tiny at 32 px on the session's tiny dataset with DeepSpeed (gloo) and MLflow (SQLite under tmp_path);
each one gets a fresh submitit folder (job ids restart at 1 on a new cluster). Slow ones say so in their
docstring. The whole file took 7 minutes on a 2-core machine that was also running other test suites (load 5-8):
every job start imports torch/DeepSpeed/DALI/MLflow (10-40 s), a requeued job waits ~15-20 s before it starts
again (cred_expire=10), and the timeout test needs SLURM's time-limit warning (45-75 s into a 2-minute job).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import TINY_CLASSES, last_json, run_spnet, tiny_train_args

from slurm_fixtures import missing_slurm_binaries  # noqa: F401  (the cluster fixture comes from conftest)

from spnet_dist.launch.profile import KEYS, load_profile, split_cluster_overrides
from spnet_dist.launch.submit import expand_sweeps
from spnet_dist.launch.task import master_port, parse_slurm_duration

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 420  # s: one submitted job, requeues included, on a busy 2-core machine


def job_args(data: Path, tmp: Path, *extra: str) -> list[str]:
    """conftest.tiny_train_args without the verb and checkpoint.dir (submit gives every job its own)."""
    return [a for a in tiny_train_args(data, tmp)[1:] if not a.startswith("checkpoint.dir=")] + list(extra)


def submit(slurm, tmp: Path, *args: str, timeout: float = JOB_TIMEOUT, check: bool = True):
    return run_spnet("submit", "--folder", str(tmp / "slurm"), *args, cwd=tmp, env=slurm.environ(),
                     timeout=timeout, check=check)


def submit_background(slurm, tmp: Path, *args: str) -> subprocess.Popen:
    """`spnet submit --wait ...` in the background (it returns when the job is over, requeues included)."""
    env = {**slurm.environ(), "PYTHONUNBUFFERED": "1"}
    with open(tmp / "submit.err", "w") as err:  # a file, not a pipe nobody reads while the job runs
        return subprocess.Popen([sys.executable, "-m", "spnet_dist.cli", "submit", "--wait", "--folder",
                                 str(tmp / "slurm"), *args], cwd=tmp, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=err)


def finish(proc: subprocess.Popen, timeout: float = JOB_TIMEOUT) -> dict:
    err_file = Path(proc.args[proc.args.index("--folder") + 1]).parent / "submit.err"
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"spnet submit --wait did not return in {timeout} s:\n{err_file.read_text()[-3000:]}")
    assert proc.returncode == 0, f"spnet submit failed ({proc.returncode}):\n{out[-3000:]}\n" \
                                 f"{err_file.read_text()[-3000:]}"
    return last_json(out)


def index(tmp: Path) -> list[dict]:
    path = tmp / "slurm" / "jobs.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def wait_for(what: str, predicate, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def mlflow_runs(tmp: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("spnet")
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def loss_steps(client, run_id: str) -> list[tuple[int, int]]:
    """(step, timestamp) of every logged train/loss value, in step order."""
    return sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, "train/loss"))


def logged_steps(tmp: Path) -> int:
    try:
        client, runs = mlflow_runs(tmp)
    except Exception:  # noqa: BLE001 - the store is being created by the job
        return 0
    return max((len(client.get_metric_history(r.info.run_id, "train/loss")) for r in runs), default=0)


def job_events(entry: dict) -> list[dict]:
    path = Path(entry["job_dir"]) / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def task_pids(entry: dict) -> list[int]:
    """The PIDs the tasks print at start ("spnet-slurm: job ...; pid N") in their stderr logs."""
    out = []
    for t in range(entry["tasks"]):
        text = (Path(entry["folder"]) / f"{entry['job_id']}_{t}_log.err").read_text()
        out.append(int(text.rsplit("; pid ", 1)[1].split()[0]))
    return out


def scontrol_field(slurm, job_id: str, key: str) -> str:
    out = slurm.run("scontrol", "show", "job", job_id, "-o").stdout
    return out.split(f"{key}=")[1].split()[0]


def assert_each_step_once(client, run_id: str, steps: int) -> list[tuple[int, int]]:
    hist = loss_steps(client, run_id)
    assert [s for s, _ in hist] == list(range(1, steps + 1)), "a step is missing or was trained twice"
    return hist


def assert_resumed_at(hist: list[tuple[int, int]], step: int, min_gap_s: float = 5.0) -> None:
    """Steps <= ``step`` were logged by the first job incarnation, steps > ``step`` by the requeued one."""
    ts = dict(hist)
    assert step < len(hist), f"stopped at step {step} of {len(hist)}: nothing left to resume"
    assert ts[step + 1] - ts[step] >= min_gap_s * 1000, "no requeue gap between the checkpoint step and the next"


# ---------------------------------------------------------------------------------------------------- fast


def test_dry_run_prints_the_sbatch_script(tiny_data, tmp_path):
    """--dry-run: the sbatch directives from the profile, one array task per swept value; nothing submitted."""
    r = run_spnet("submit", "--dry-run", "--cluster", "example_gpu", "--folder", str(tmp_path / "slurm"),
                  *job_args(tiny_data, tmp_path, "trainer.batch_size=4"), "--sweep", "method.target_rate=0.3,0.5",
                  cwd=tmp_path)  # 16 ranks x 4 = the 64 tiny training images
    script = r.stdout
    for line in ("#!/bin/bash", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --mem=480GB", "#SBATCH --time=1440",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120", "#SBATCH --requeue",
                 "#SBATCH --array=0-1%2", "#SBATCH --open-mode=append", "module load cuda/12.4 nccl",
                 "export SUBMITIT_EXECUTOR=slurm"):
        assert line in script, f"{line!r} missing from:\n{script}"
    srun = next(x for x in script.splitlines() if x.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "-m submitit.core._submit" in srun
    out = last_json(r.stdout)
    assert out["dry_run"] and out["cluster"] == "example_gpu" and out["tasks_per_job"] == 16
    assert out["swept"] == ["method.target_rate"]
    jobs = out["jobs"]
    assert [[o for o in j["overrides"] if o.startswith("method.target_rate=")] for j in jobs] == [
        ["method.target_rate=0.3"], ["method.target_rate=0.5"]]
    assert len({j["checkpoint_dir"] for j in jobs}) == 2
    assert all(f"checkpoint.dir={j['checkpoint_dir']}" in j["overrides"] for j in jobs)
    assert all("trainer.threads=10" in j["overrides"] for j in jobs)
    assert not (tmp_path / "slurm").exists()


def test_dry_run_matches_what_submitit_writes(tiny_data, tmp_path, monkeypatch):
    """The printed script is the one submitit's executor renders for the same parameters."""
    if missing_slurm_binaries():
        pytest.skip("submitit's SLURM executor needs srun on PATH")
    import submitit

    from spnet_dist.launch.submit import plan, sbatch_script

    monkeypatch.setenv("PATH", f"/usr/bin:/usr/sbin:{__import__('os').environ['PATH']}")
    p = plan(job_args(tiny_data, tmp_path), cluster="local", folder=tmp_path / "slurm")
    ex = submitit.AutoExecutor(folder=Path(p["submission_dir"]) / "submitit" / "%j", cluster="slurm")
    ex.update_parameters(**p["executor_parameters"])
    assert sbatch_script(p) == ex._executor._make_submission_file_text(ex._executor._submitit_command_str, "x")


def test_profiles_and_overrides(tiny_data):
    name, items, rest = split_cluster_overrides(["cluster=local", "cluster.timeout_min=3", "trainer.epochs=2"])
    assert (name, items, rest) == ("local", ["cluster.timeout_min=3"], ["trainer.epochs=2"])
    p = load_profile("local", ["cluster.timeout_min=3", "cluster.additional_parameters.begin=now+1hour"])
    assert p["timeout_min"] == 3 and p["additional_parameters"] == {"begin": "now+1hour"}
    assert set(KEYS) == set(yaml.safe_load((REPO / "configs/cluster/local.yaml").read_text()))
    assert expand_sweeps(["a=1", "b=x,y", "c=range(1,3)", "d=[1,2]"]) == [
        ["a=1", "b=x", "c=1", "d=[1,2]"], ["a=1", "b=x", "c=2", "d=[1,2]"],
        ["a=1", "b=y", "c=1", "d=[1,2]"], ["a=1", "b=y", "c=2", "d=[1,2]"]]
    assert parse_slurm_duration("1-02:03:04") == 93784 and parse_slurm_duration("2:05") == 125
    assert parse_slurm_duration("UNLIMITED") is None
    assert master_port("17") == master_port("17") != master_port("17", restart=1)
    assert all(20000 <= master_port(str(j), r) < 40000 for j in range(50) for r in range(3))


def test_task_environment_and_checkpoint(monkeypatch):
    """The torch.distributed variables of a task of a 2-node x 2-task job, from SLURM's variables alone."""
    import socket

    import submitit

    from spnet_dist.launch.task import SlurmTask, distributed_env

    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
                 "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2",
                 "SLURM_JOB_NODELIST": "nosuchnode[7-8]"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: NodeAddr unknown, the name does not resolve
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    env = distributed_env()
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": socket.gethostname(), "MASTER_PORT": str(master_port("42"))}
    task = SlurmTask(["a=1"], "/tmp/x", cluster="local", submission="s", max_requeues=1, timeout_min=2,
                     signal_delay_s=30)
    delayed = task.checkpoint()  # submitit's handler (rank 0, before training started): requeue the same task
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is task


@pytest.mark.parametrize("args, needle", [
    (["cluster=nosuchsite"], "available: ["),
    (["--cluster", "local", "cluster.timeout_min=1"], "timeout_min >= 2"),
    (["cluster.walltime=5"], "unknown cluster key 'walltime'"),
    (["cluster.signal_delay_s=600"], "signal_delay_s=600 must be shorter"),
    (["trainer.batch_sise=4"], "batch_sise"),
    (["data.root=/nonexistent/imagenet"], "no class folders"),
    (["data=imagenet"], "data.root is required and has no default"),
    (["model.num_classes=7"], "model.num_classes=7 but"),  # checked on the login node, not in the job
    (["model.num_classes=4", "trainer.batch_size=40"], "2 rank(s) x 40 = 80 images per step"),
    (["--cluster", "example_gpu", "model.num_classes=4", "trainer.batch_size=8"], "16 rank(s) x 8"),
    (["method=spnet_code", "method.teacher_precision=fp16"], "method.teacher_precision='fp16' is not valid"),
    (["tracking.uri=sqlit:///x.db"], "tracking.uri='sqlit:///x.db': unknown scheme 'sqlit'; did you mean sqlite?"),
    (["tracking.ui.port=70000"], "tracking.ui.port=70000 is out of range; it must be in [1, 65535]"),
])
def test_bad_input_is_one_clear_error(tiny_data, tmp_path, args, needle):
    base = [] if any(a.startswith(("data.root=", "data=")) for a in args) else [f"data.root={tiny_data}"]
    r = run_spnet("submit", "--dry-run", "--folder", str(tmp_path / "slurm"), *base, *args, cwd=tmp_path,
                  check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_jobs_without_an_index(tmp_path):
    r = run_spnet("jobs", "--folder", str(tmp_path / "none"), "status", cwd=tmp_path, check=False)
    assert r.returncode == 2 and "no jobs in" in r.stderr
    assert "no jobs in" in run_spnet("jobs", "--folder", str(tmp_path / "none"), cwd=tmp_path).stdout


# ---------------------------------------------------------------------------------------------------- SLURM


def test_two_tasks_on_one_node_train_into_one_run(slurm_cluster, tiny_data, tmp_path):
    """Slow (~40 s): 1 node x 2 tasks, DeepSpeed over gloo, exactly one MLflow run; `spnet jobs` on it."""
    out = last_json(submit(slurm_cluster, tmp_path, "--wait", *job_args(tiny_data, tmp_path, "trainer.epochs=2"),
                           "cluster.nodes=1", "cluster.tasks_per_node=2").stdout)
    assert out["ok"] and out["tasks_per_job"] == 2
    (job,) = out["jobs"]
    summary = job["summary"]
    steps = 2 * TINY_CLASSES * 16 // (2 * 8)
    assert summary["world_size"] == 2 and summary["steps"] == steps and not summary["preempted"]
    assert job["state"] == "COMPLETED" and job["restarts"] == 0
    assert len(set(summary["slurm"]["rank_nodes"])) == 1

    client, runs = mlflow_runs(tmp_path)
    assert [r.info.run_id for r in runs] == [out["mlflow_run_id"]] == [summary["mlflow_run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.data.tags["slurm.job_id"] == out["job_id"] and run.data.tags["slurm.cluster"] == "local"
    assert_each_step_once(client, run.info.run_id, steps)
    assert Path(summary["checkpoint"]).parent == Path(job["checkpoint_dir"])

    env = slurm_cluster.environ()
    listing = last_json(run_spnet("jobs", "--folder", str(tmp_path / "slurm"), "list", "--json", cwd=tmp_path,
                                  env=env).stdout)
    assert [(j["job_id"], j["state"]) for j in listing["jobs"]] == [(out["job_id"], "COMPLETED")]
    status = last_json(run_spnet("jobs", "--folder", str(tmp_path / "slurm"), "status", out["job_id"],
                                 cwd=tmp_path, env=env).stdout)
    assert status["state"] == "COMPLETED" and status["mlflow_run_id"] == run.info.run_id
    events = [json.loads(line) for line in (Path(job["checkpoint_dir"]).parent / "events.jsonl").read_text()
              .splitlines()]  # the run id is recorded when training starts, not only when the job ends
    assert [e["event"] for e in events] == ["started", "tracking", "completed"]
    assert events[1]["mlflow_run_id"] == run.info.run_id and events[1]["step"] == 0
    assert status["latest_checkpoint"] == f"global_step{steps}" and status["interruptions"] == []
    tail = run_spnet("jobs", "--folder", str(tmp_path / "slurm"), "tail", "--task", "1", cwd=tmp_path,
                     env=env).stdout
    assert "rank 1/2 local 1/2 on node" in tail and "training finished" in tail


def test_two_nodes_one_task_each(slurm_cluster, tiny_data, tmp_path):
    """Slow (~40 s): 2 nodes (two slurmd on this host) x 1 task; MASTER_ADDR from n1's NodeAddr."""
    out = last_json(submit(slurm_cluster, tmp_path, "--wait", *job_args(tiny_data, tmp_path),
                           "cluster.nodes=2", "cluster.tasks_per_node=1").stdout)
    assert out["ok"]
    summary = out["jobs"][0]["summary"]
    assert summary["world_size"] == 2 and summary["slurm"]["rank_nodes"] == ["n1", "n2"]
    _, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].data.tags["slurm.rank_nodes"] == "n1,n2"
    logs = [Path(out["stderr"].replace("_0_log.err", f"_{t}_log.err")).read_text() for t in (0, 1)]
    assert "rank 0/2 local 0/1 on node n1; master 127.0.0.1:" in logs[0]
    assert "rank 1/2 local 0/1 on node n2; master 127.0.0.1:" in logs[1]


def test_preempted_job_is_requeued_and_resumes_into_the_same_run(slurm_cluster, tiny_data, tmp_path):
    """Slow (~1-2 min): `scancel --signal=USR2` mid-training -> all ranks checkpoint -> rank 0 requeues -> the job
    restarts (~20 s later), resumes from that checkpoint and finishes in the same MLflow run; no step twice.
    Both ranks are frozen (SIGSTOP) while the signal is sent, so it lands mid-training at any machine speed."""
    epochs = 6  # 24 steps at 2 ranks x batch 8
    proc = submit_background(slurm_cluster, tmp_path, *job_args(tiny_data, tmp_path, f"trainer.epochs={epochs}"),
                             "cluster.tasks_per_node=2")
    try:
        wait_for("training to start", lambda: logged_steps(tmp_path) >= 2, timeout=240, poll=0.2)
        (entry,) = index(tmp_path)
        pids = task_pids(entry)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            slurm_cluster.run("scancel", "--signal=USR2", entry["job_id"])
            time.sleep(1)  # let slurmstepd deliver it
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        out = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    (job,) = out["jobs"]
    steps = epochs * TINY_CLASSES * 16 // (2 * 8)
    assert out["ok"] and job["summary"]["steps"] == steps and job["restarts"] == 1
    assert job["summary"]["slurm"]["restart"] == 1

    events = job_events(entry)
    (stop,) = [e for e in events if e["event"] in ("preemption", "timeout")]
    assert stop["event"] == "preemption" and stop["requeued"] and stop["restart"] == 0
    assert [e["event"] for e in events] == ["started", "tracking", "preemption", "started", "tracking", "completed"]
    tracking = [e for e in events if e["event"] == "tracking"]
    assert [e["step"] for e in tracking] == [0, stop["step"]]  # the requeued job names its run when it resumes
    assert {e["mlflow_run_id"] for e in tracking} == {stop["mlflow_run_id"]}

    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.run_id == out["mlflow_run_id"] == stop["mlflow_run_id"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["slurm.interruptions"] == f"preemption@step{stop['step']}"
    assert_resumed_at(assert_each_step_once(client, run.info.run_id, steps), stop["step"])
    log = Path(job["stderr"]).read_text()
    assert f"resumed from {entry['checkpoint_dir']}/global_step{stop['step']}" in log


def test_too_short_time_limit_is_requeued_on_timeout_and_completes(slurm_cluster, tiny_data, tmp_path):
    """Slow (~2 min): timeout_min=2 with signal_delay_s=45: SLURM sends its time-limit warning (USR2) 45-75 s
    into the job. The job checkpoints, classifies the stop as a timeout (time left < signal window), requeues
    itself, resumes from that checkpoint in the same MLflow run and completes.

    So that the warning arrives during training whatever this machine's speed, the test freezes the training
    process (SIGSTOP) once it has trained a few steps: "training takes longer than the time limit". slurmstepd
    continues a stopped task when it signals it (and the test sends SIGCONT itself once the job ran 77 s). The test
    then gives the requeued job more time (scontrol update TimeLimit, as an operator would), so that it finishes
    in one go."""
    epochs = 12  # 96 steps at 1 rank; the test stops the clock of training, not its length
    proc = submit_background(slurm_cluster, tmp_path, *job_args(tiny_data, tmp_path, f"trainer.epochs={epochs}"),
                             "cluster.tasks_per_node=1", "cluster.timeout_min=2", "cluster.signal_delay_s=45",
                             "cluster.max_requeues=3")
    try:
        wait_for("training to start", lambda: logged_steps(tmp_path) >= 3, timeout=240, poll=0.2)
        (entry,) = index(tmp_path)
        (pid,) = task_pids(entry)
        os.kill(pid, signal.SIGSTOP)  # SLURM continues the task when it delivers the warning signal

        def interrupted():
            if parse_slurm_duration(scontrol_field(slurm_cluster, entry["job_id"], "RunTime")) > 77:
                try:
                    os.kill(pid, signal.SIGCONT)  # the warning was sent by now in any case
                except ProcessLookupError:
                    pass
            return next((e for e in job_events(entry) if e["event"] in ("timeout", "preemption")), None)

        stop = wait_for("a checkpointed timeout", interrupted, timeout=180, poll=0.5)
        slurm_cluster.run("scontrol", "update", f"JobId={entry['job_id']}", "TimeLimit=15")
        out = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    (job,) = out["jobs"]
    steps = epochs * TINY_CLASSES * 16 // 8
    assert out["ok"] and job["summary"]["steps"] == steps and job["restarts"] == 1
    assert stop["event"] == "timeout" and stop["requeued"] and 3 <= stop["step"] < steps, stop
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["slurm.interruptions"] == f"timeout@step{stop['step']}"
    assert_resumed_at(assert_each_step_once(client, runs[0].info.run_id, steps), stop["step"])


def test_sweep_submits_one_array_task_per_value(slurm_cluster, tiny_data, tmp_path):
    """Slow (~50 s): --sweep method.target_rate=0.3,0.5 -> a 2-task job array -> two runs with their params."""
    out = last_json(submit(slurm_cluster, tmp_path, "--wait", *job_args(tiny_data, tmp_path),
                           "--sweep", "method.target_rate=0.3,0.5", "cluster.tasks_per_node=1").stdout)
    assert out["ok"] and len(out["job_ids"]) == 2
    base = out["job_ids"][0].split("_")[0]
    assert out["job_ids"] == [f"{base}_0", f"{base}_1"]
    client, runs = mlflow_runs(tmp_path)
    by_rate = {r.data.params["method.target_rate"]: r for r in runs}
    assert sorted(by_rate) == ["0.3", "0.5"] and len(runs) == 2
    for job, rate in zip(out["jobs"], ("0.3", "0.5")):
        run = by_rate[rate]
        assert job["mlflow_run_id"] == run.info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["slurm.job_id"] == job["job_id"] and run.data.tags["target_rate"] == rate
        assert Path(job["summary"]["checkpoint"]).is_relative_to(job["checkpoint_dir"])


def test_jobs_cancel(slurm_cluster, tiny_data, tmp_path):
    """A job held back by --begin is cancelled by `spnet jobs cancel` (no training runs)."""
    out = last_json(submit(slurm_cluster, tmp_path, *job_args(tiny_data, tmp_path),
                           "cluster.additional_parameters.begin=now+1hour").stdout)
    env = slurm_cluster.environ()
    assert out["mlflow_run_ids"] is None and out["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    status = last_json(run_spnet("jobs", "--folder", str(tmp_path / "slurm"), "status", cwd=tmp_path,
                                 env=env).stdout)
    assert status["job_id"] == out["job_id"] and status["state"] == "PENDING"
    r = last_json(run_spnet("jobs", "--folder", str(tmp_path / "slurm"), "cancel", out["job_id"], cwd=tmp_path,
                            env=env).stdout)
    assert r["cancelled"]
    assert wait_for("CANCELLED", lambda: scontrol_field(slurm_cluster, out["job_id"], "JobState") == "CANCELLED",
                    timeout=30)
