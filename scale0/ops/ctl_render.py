"""What `scale0 ctl` prints: the control replies of ops/control.py as text for
people (`--json` prints them as they are). Pure: dicts in, strings out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

TAP_HEADER = f"{'TIME':<12} {'STATUS':>6} {'METHOD':<7} {'MS':>8}  {'WORKER':<24} PATH"


def tap_line(r: dict[str, Any]) -> str:
    clock = datetime.fromtimestamp(r["time"]).strftime("%H:%M:%S.%f")[:12]
    return (f"{clock:<12} {r['status']:>6} {r['method']:<7} {r['ms']:>8.1f}  "
            f"{r['worker'] or '-':<24} {r['path']}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart; numbers aligned right."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) and bool(rows)
               for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(row, widths, numeric, strict=True)).rstrip()

    body = [line(row) for row in cells] or ["(none)"]
    return "\n".join([line(list(headers)), *body])


def duration(seconds: float) -> str:
    """3s, 2m05s, 3h07m, 2d04h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render_status(st: dict[str, Any]) -> str:
    b = st["broker"]
    parts = [f"broker pid {b['pid']} ({b['state']}), up {duration(b['uptime_s'])}, "
             f"workers at {b['workers_endpoint']}, control {b['control']}",
             f"requests held {st['requests']}, connections {st['connections']}", "",
             table(["MONGREL2 SEND_SPEC", "RECV_SPEC", "CONNECTED", "SUBSCRIBED", "HELD",
                    "REPLIES"],
                   [[ln["send_spec"], ln["recv_spec"], _yes(ln["connected"]),
                     _yes(ln["subscribed"]), ln["held"], ln["replies"]]
                    for ln in st["links"]]), "",
             table(["SERVICE", "ROUTES", "QUEUED", "IN_FLIGHT", "WORKERS", "READY", "CAPACITY",
                    "TIMEOUT"],
                   [[s["name"] or "-", ",".join(s["routes"]) or "-", s["queued"],
                     s["in_flight"], s["workers"], s["ready"], s["capacity"],
                     f"{s['timeout_s']:g}s"] for s in st["services"]]), "",
             table(["WORKER", "ID", "SERVICES", "LOAD", "STATE", "AGE", "SERVED"],
                   [[w["label"], w["id"], ",".join(w["services"]),
                     _load(w), _worker_state(w),
                     duration(w["age_s"]), w["served"]] for w in st["workers"]]), ""]
    limits = st.get("limits")
    if limits:
        parts.append("limits: " + " ".join(f"{name} {used}/{most}"
                                            for name, (used, most) in limits.items()))
    if st.get("orphaned_routes"):
        parts += ["", table(["ROUTE WITHOUT WORKERS", "SERVICE", "FORGOTTEN IN"],
                            [[o["route"], o["service"], duration(o["forget_in_s"])]
                             for o in st["orphaned_routes"]])]
    if st.get("refused_hellos"):
        parts += ["", table(["REFUSED HELLO", "AGO", "CODE", "REASON"],
                            [[r["worker"], duration(r["age_s"]), r["code"], r["reason"]]
                             for r in st["refused_hellos"]])]
    if limits or st.get("orphaned_routes") or st.get("refused_hellos"):
        parts.append("")
    counters = st["counters"]
    parts.append("counters: " + " ".join(f"{k}={v}" for k, v in counters.items()))
    keys = st.get("keys", {})
    if keys.get("curve"):
        parts.append(f"CURVE: {keys['keys']} authorized keys in {keys['authorized_keys']} "
                     f"(reloaded {keys['reloads']} times), handshakes accepted="
                     f"{keys['accepted']} refused={keys['refused']}, HELLOs refused="
                     f"{keys['hellos_refused']}, messages of revoked keys dropped="
                     f"{keys['revoked_messages']}")
    return "\n".join(parts)


def _load(w: dict[str, Any]) -> str:
    """'in flight/capacity', and '+prefetch' for a worker that lets requests wait."""
    prefetch = w.get("prefetch", 0)
    return f"{w['in_flight']}/{w['capacity']}" + (f"+{prefetch}" if prefetch else "")


def _worker_state(w: dict[str, Any]) -> str:
    if w["draining"]:  # `state` says why: an operator's drain, or leaving
        return str(w.get("state", "draining"))
    if w.get("ejected_s"):
        return f"ejected {duration(w['ejected_s'])}"
    return "ready"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# command: (key of the workers it acted on, what it did to them, key of the
# workers it had done already or could not, the note for those)
_WORKER_ACTIONS = {
    "drain": ("drained", "draining: no new request, the ones in progress finish "
              "(undrain to undo)", "already_draining", "already draining"),
    "undrain": ("ready", "take requests again", "still_draining",
                "still draining: drained by another name, or leaving"),
    "recycle": ("recycled", "asked to finish and leave (their pool starts new ones)",
                "already_leaving", "already leaving"),
}
_WORKER_ACTIONS["ready"] = _WORKER_ACTIONS["undrain"]


def render(command: str, result: Any) -> str:
    if command == "status":
        return render_status(result)
    if command == "routes" and "routes" in result:
        return table(["ROUTE", "SERVICE", "ORIGIN"],
                     [[r["route"], r["service"], r["origin"]] for r in result["routes"]])
    if command == "routes" and "added" in result:
        return f"route {result['added']} -> {result['service']} added"
    if command == "routes":
        return f"route {result['removed']} (was -> {result['service']}) removed"
    if command in _WORKER_ACTIONS:
        done, what, others, note = _WORKER_ACTIONS[command]
        names = result[done] + [f"{n} ({note})" for n in result[others]]
        return (f"{result['kind']} {result['target']}: {len(result[done])} worker(s) {what}"
                + "".join(f"\n  {n}" for n in names))
    if command == "shutdown":
        how = (f"gracefully (up to {result['graceful_timeout_s']:g} s for requests in progress)"
               if result["graceful"] else "now (requests in progress get 503)")
        return f"broker pid {result['pid']} stopping {how}"
    return json.dumps(result)
