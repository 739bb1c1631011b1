"""Pieces of `dnnlab bench`'s report: a Markdown table, a process's peak memory in MB, and the targets the
measurements are checked against."""
from __future__ import annotations


def markdown(title: str, rows: list[dict]) -> str:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def rss_mb(result: dict | None) -> int | None:
    """A process's peak resident memory in whole MB; None where it was not measured or failed."""
    return None if result is None or "error" in result else round(result["peak_rss_mb"])


def targets(speed: list[dict], stacked: list[dict], default_rss: float | None) -> list[dict]:
    by = {r["contender"]: r for r in speed}
    checks = []

    def ratio(name):
        row = by.get(name)
        return row["x dnnlab"] if row and isinstance(row.get("x dnnlab"), float) else None

    dl, keras, floor = ratio("DataLoader loop (torch default threads)"), ratio("Keras model.fit"), \
        ratio("arithmetic floor")
    checks.append({"target": "dnnlab >= 5x faster than the DataLoader loop", "measured": dl,
                   "met": None if dl is None else dl >= 5})
    checks.append({"target": "dnnlab >= 3x faster than Keras", "measured": keras,
                   "met": None if keras is None else keras >= 3})
    checks.append({"target": "dnnlab within 10x the arithmetic floor",
                   "measured": None if not floor else round(1 / floor, 2),
                   "met": None if not floor else 1 / floor <= 10})
    checks.append({"target": "a default run under 1.5 GB resident", "measured": default_rss,
                   "met": None if default_rss is None else default_rss < 1536})
    stack = next((r for r in stacked if "stacked" in r["run"] and isinstance(r.get("x 1 job (epoch)"), float)), None)
    if stack:
        checks.append({"target": f"{stack['jobs']} stacked jobs <= 2.5x one job (per epoch)",
                       "measured": stack["x 1 job (epoch)"], "met": stack["x 1 job (epoch)"] <= 2.5})
        checks.append({"target": f"{stack['jobs']} stacked jobs <= 2.5x one job (whole command)",
                       "measured": stack["x 1 job (wall)"], "met": stack["x 1 job (wall)"] <= 2.5})
    return checks
