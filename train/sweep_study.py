"""The sweep's Optuna study: its storage, continuation, trials left behind, the budget, the leaderboard.

The study is the sweep's only record. By default it is a journal file in the sweep directory
(``optuna.journal``: Optuna's JournalStorage with JournalFileBackend); ``--storage URL`` puts it in
any database Optuna accepts (``postgresql://...``), so sweeps on several machines share it. Each
trial carries user attributes that make continuation work: its run name and directory, the sweep
process that owns it (host, pid, boot, start time) and a heartbeat, ``retry_of`` for a retry, its
exit code, epochs and a note for the leaderboard.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.trial import FrozenTrial, TrialState

from train.errors import UserError
from train.fsutil import atomic_file, atomic_write_text
from train.redaction import redact_text
from train.sweep_spec import SearchSpace, agent_text, is_fresh

JOURNAL_NAME = "optuna.journal"
STUDY_ATTR = "train.sweep"  # the study's user attribute holding the sweep's definition
HEARTBEAT_S = 60.0  # a running trial's heartbeat interval
STALE_AFTER_S = 600.0  # a RUNNING trial of another machine without a heartbeat for this long is left behind


# --------------------------------------------------------------------------------------------------
# Storage and study
# --------------------------------------------------------------------------------------------------


def masked_url(url: str) -> str:
    """A database URL with its password hidden (for messages and the dashboard line)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy can parse: show it without anything after '//user:'
        return redact_text(url.split("@")[-1] if "@" in url else url)


def check_journal(path: Path) -> None:
    """Refuse a journal file Optuna could not replay safely, before anything reads or appends to it.

    Optuna skips an undecodable *last* line (a torn write) and would append after it, which turns it
    into a broken middle line; any other undecodable line stops the replay with a traceback."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise UserError(f"cannot read the study journal '{path}': {e.strerror or e}") from None
    tail = lines.pop()  # what follows the last newline: b"" for a complete file
    for i, line in enumerate(lines + ([tail] if tail else []), 1):
        problem = "no newline at its end (a torn write)" if i > len(lines) else None
        if problem is None:
            try:
                rec = json.loads(line)
                problem = None if isinstance(rec, dict) and isinstance(rec.get("op_code"), int) else "no op_code"
            except ValueError as e:
                problem = f"not JSON: {e}"
        if problem:
            raise UserError(f"{path} line {i} is not an Optuna journal record ({problem}); nothing was changed. "
                            "The trials' run directories are intact: move the file aside and run the same command "
                            "to start a new study (or, if only the last line is torn, delete that line)")


def with_installed_driver(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 takes it to mean psycopg 3,
    older versions psycopg2 (the test extra's psycopg2-binary)."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _rdb_storage(url: str) -> optuna.storages.BaseStorage:
    import sqlalchemy.exc

    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(with_installed_driver(url))
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            last = e  # two sweeps creating the tables of a new database at once: the loser retries
            time.sleep(1.0 + attempt)
        except ImportError as e:
            raise UserError(f"--storage {masked_url(url)}: {e} (PostgreSQL needs: pip install psycopg2-binary)") \
                from None
        except Exception as e:
            raise UserError(f"--storage {masked_url(url)}: cannot open it ({type(e).__name__}: "
                            f"{redact_text(str(e).strip().splitlines()[0] if str(e).strip() else '')})") from None
    raise UserError(f"--storage {masked_url(url)}: cannot create Optuna's tables ({last})")


def open_storage(url: str | None, sweep_dir: Path) -> tuple[optuna.storages.BaseStorage, str]:
    """The study's storage and how to name it (for ``optuna-dashboard``): a URL with ``://`` is a
    database, anything else a journal file path (default: ``<sweep dir>/optuna.journal``)."""
    if url and "://" in url:
        return _rdb_storage(url), masked_url(url)
    path = Path(url) if url else sweep_dir / JOURNAL_NAME
    if path.exists():
        check_journal(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    except OSError:
        raise
    except Exception as e:
        raise UserError(f"{path} is not an Optuna journal this sweep can read ({type(e).__name__}: {e}); nothing "
                        "was changed. Move it aside and run the same command to start a new study") from None
    return storage, str(path)


def definition(spec: dict, fixed: list[str], seed: int) -> dict:
    """What makes two sweeps the same study: continuing with anything else is refused."""
    keys = ("method", "metric", "parameters", "early_terminate", "program", "command")
    return {**{k: spec.get(k) for k in keys}, "fixed": list(fixed), "seed": seed}


def fingerprint(defn: dict) -> str:
    return hashlib.sha256(json.dumps(defn, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_same_sweep(study: optuna.Study, where: str, fp: str) -> None:
    deadline = time.time() + 10.0  # a sweep that created the study a moment ago writes the attribute next
    while (attr := study.user_attrs.get(STUDY_ATTR)) is None and not study.trials and time.time() < deadline:
        time.sleep(0.5)
    if not isinstance(attr, dict) or "fingerprint" not in attr:
        raise UserError(f"study '{study.study_name}' in {where} was not created by train.sweep; pass --study NAME "
                        "(or --name) for a new study")
    if attr["fingerprint"] != fp:
        raise UserError(f"study '{study.study_name}' in {where} holds a different sweep (other parameters, method, "
                        "metric, seed or fixed overrides); continue it with the same command, or pass --name (or "
                        "--study) for a new sweep")


def open_study(storage, where: str, name: str, defn: dict, space: SearchSpace, sampler, pruner) -> optuna.Study:
    """Load the study ``name`` when it exists (refused if it is another sweep), else create it.

    Looking it up first writes nothing, so a refusal leaves the storage as it was."""
    fp = fingerprint(defn)
    try:
        storage.get_study_id_from_name(name)
        exists = True
    except KeyError:
        exists = False
    if not exists:
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction=space.direction,
                                        sampler=sampler, pruner=pruner)
            study.set_user_attr(STUDY_ATTR, {"fingerprint": fp, "definition": json.loads(json.dumps(defn,
                                                                                                    default=str))})
            return study
        except DuplicatedStudyError:
            pass  # another sweep created it at the same moment: join it
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    _check_same_sweep(study, where, fp)
    return study


@contextmanager
def sweep_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` between the sweep processes of one sweep directory (one machine)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Owners, trials left behind, the budget
# --------------------------------------------------------------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time since boot (``/proc/<pid>/stat`` field 22): a pid reused by another
    process has another one. None: no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return "?"
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"


def owner() -> dict:
    """This sweep process, as recorded on the trials it runs."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot": _boot_id(), "start": _start_time(os.getpid())}


def owner_gone(t: FrozenTrial, now: float) -> str | None:
    """Why a RUNNING trial's sweep process is known to be gone (None: alive, or cannot tell)."""
    o, beat = t.user_attrs.get("owner"), t.user_attrs.get("heartbeat")
    if not isinstance(o, dict):
        return None  # just asked, its owner not written yet
    where = f"sweep process {o.get('pid')} on {o.get('host')}"
    if o.get("host") == socket.gethostname():
        if o.get("boot") != _boot_id():
            return f"{where} did not survive a reboot"
        started = _start_time(int(o.get("pid", -1)))
        if started is None or (started != "?" and started != o.get("start")):
            return f"{where} is gone"
        return None
    if isinstance(beat, (int, float)) and now - beat > STALE_AFTER_S:
        return f"{where}: no heartbeat for {(now - beat) / 60:.0f} min"
    return None


def enqueue_retry(study: optuna.Study, t: FrozenTrial | optuna.Trial, number: int) -> None:
    """Queue trial ``number`` again with the same parameters and run name (Optuna gives it a new
    number; ``ask`` hands queued trials out first)."""
    study.enqueue_trial(dict(t.params), user_attrs={"retry_of": number, "run": t.user_attrs.get("run")},
                        skip_if_exists=False)


def recover_left_behind(study: optuna.Study) -> list[str]:
    """Mark FAIL every RUNNING trial whose sweep process is gone, and queue it once more.

    Marking FAIL is the claim: when two sweeps find the same trial at once, the storage refuses the
    second one's update, so each trial is retried once."""
    messages, now = [], time.time()
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        reason = owner_gone(t, now) if t.state == TrialState.RUNNING else None
        if reason is None:
            continue
        try:
            optuna.trial.Trial(study, t._trial_id).set_user_attr("note", f"left running ({reason})")
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):
            continue  # another sweep claimed it first
        if t.number not in retried:
            enqueue_retry(study, t, t.number)
        messages.append(f"trial {t.number} ({t.user_attrs.get('run')}) was left running ({reason}): marked FAIL, "
                        "queued again")
    return messages


def ask_next(study: optuna.Study, distributions: dict, max_runs: int, lock_path: Path) -> optuna.Trial | None:
    """The next trial to run, or None when the study has its ``max_runs`` trials.

    Queued retries come first. The count and the ask happen under the sweep directory's lock, so
    the sweep processes of one machine never exceed ``max_runs``; sweeps on other machines (a shared
    database) are caught after the ask, by the trial's place among the study's numbers."""
    with sweep_lock(lock_path):
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and sum(map(is_fresh, trials)) >= max_runs:
            return None
        trial = study.ask(distributions)
        trial.set_user_attr("owner", owner())
        trial.set_user_attr("heartbeat", time.time())
    if "retry_of" in trial.user_attrs:
        return trial
    place = sum(1 for t in study.get_trials(deepcopy=False) if is_fresh(t) and t.number < trial.number)
    if place >= max_runs:
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial


# --------------------------------------------------------------------------------------------------
# Leaderboard
# --------------------------------------------------------------------------------------------------

STATE_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.FAIL: 2, TrialState.RUNNING: 3,
               TrialState.WAITING: 4}


def _row(t: FrozenTrial, space: SearchSpace, retried_as: dict[int, FrozenTrial]) -> dict:
    a = t.user_attrs
    value = t.value if t.state == TrialState.COMPLETE else (
        t.intermediate_values[t.last_step] if t.state == TrialState.PRUNED and t.last_step is not None else None)
    note = a.get("note") or ""
    params = t.params or t.system_attrs.get("fixed_params") or {}  # a queued retry: the parameters it will use
    run_dir = a.get("run_dir") or ""
    if t.number in retried_as:  # the retry runs under the same name; this attempt's directory was moved
        note = f"{note}; retried as trial {retried_as[t.number].number}".lstrip("; ")
        run_dir = retried_as[t.number].user_attrs.get("previous_run_dir") or run_dir
    if "retry_of" in a:
        note = f"retry of trial {a['retry_of']}" + (f"; {note}" if note else "")
    best = Path(run_dir) / "checkpoints" / "best.safetensors" if run_dir else None
    return {"trial": t.number, "state": t.state.name.lower(), space.metric: value,
            "epochs": a.get("epochs", t.last_step), "test/rmse": a.get("test/rmse"), "best_epoch": a.get("best_epoch"),
            **{k: agent_text(params[k]) if k in params else "" for k in space.distributions},
            "run": a.get("run") or "", "host": (a.get("owner") or {}).get("host", ""), "run_dir": run_dir,
            "best_checkpoint": str(best) if best and best.is_file() else "", "note": note}


def leaderboard(study: optuna.Study, space: SearchSpace) -> list[dict]:
    """One row per trial: finished trials by the metric (best first, ranked), then pruned (most
    epochs first), failed, running and queued ones. Surplus trials (never run) are left out."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    retried_as = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    rows = [_row(t, space, retried_as) for t in trials]
    sign = 1.0 if space.direction == "minimize" else -1.0

    def key(r):
        v = r[space.metric]
        order = STATE_ORDER.get(TrialState[r["state"].upper()], 5)
        if order == 0:
            return (0, sign * v, r["trial"])
        return (order, -(r["epochs"] or 0) if order == 1 else 0, r["trial"])

    rows.sort(key=key)
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank if r["state"] == "complete" else ""
    return rows


def write_leaderboard(sweep_dir: Path, study: optuna.Study, space: SearchSpace) -> list[dict]:
    """Rewrite ``leaderboard.csv`` and ``leaderboard.md`` from the study (atomically: several sweep
    processes may write them; each writes the whole study)."""
    rows = leaderboard(study, space)
    hosts = {r["host"] for r in rows if r["host"]}
    columns = ["rank", "trial", "state", space.metric, "epochs", "test/rmse", "best_epoch", *space.distributions,
               "run", *(["host"] if len(hosts) > 1 else []), "run_dir", "best_checkpoint", "note"]
    with atomic_file(sweep_dir / "leaderboard.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({c: ("" if r[c] is None else r[c]) for c in columns} for r in rows)

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    md_columns = [c for c in columns if c not in ("run_dir", "best_checkpoint")]
    md = [f"# Sweep {study.study_name}: {space.metric} ({space.direction})", "",
          "| " + " | ".join(md_columns) + " |", "|" + "---|" * len(md_columns)]
    md += ["| " + " | ".join(cell(r[c]) for c in md_columns) + " |" for r in rows]
    md += ["", f"Run directories and best checkpoints: {sweep_dir / 'leaderboard.csv'}"]
    atomic_write_text(sweep_dir / "leaderboard.md", "\n".join(md) + "\n")
    return rows
