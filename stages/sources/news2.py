"""news2: synthetic ward observations, scored exactly by the RCP NEWS2 chart (2017).

`fetch` generates `count` patients from `seed` into one raw JSONL page. Each patient
draws from its own generator (seed, index), so raising `count` only appends patients
and the earlier ones stay byte-identical. Patients cycle through target risk bands
(zero, low, low-medium, medium, high), so every band occurs even in a small run; the
chart in stages/news2.py, not the generator, decides every score.

params: count (patients, default 1500), seed (default 7).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

from stages import io
from stages.news2 import Vitals, score
from stages.sources import Key, Source, SourceError

PAGE = "patients.jsonl"
# Target bands in rotation: some of each, most in the bands where escalation decisions are made.
TARGETS = ("zero", "low", "low-medium", "medium", "high", "low", "low-medium", "medium", "high", "low")
SCALE2_SHARE = 0.2  # patients with hypercapnic respiratory failure charted on SpO2 scale 2
MAX_DRAWS = 5000

# Values a parameter takes for a given number of points: (low, high) integer ranges, one picked at random.
_RANGES = {
    "resp_rate": {0: [(12, 20)], 1: [(9, 11)], 2: [(21, 24)], 3: [(5, 8), (25, 38)]},
    "systolic_bp": {0: [(111, 165), (166, 219)], 1: [(101, 110)], 2: [(91, 100)], 3: [(68, 90), (220, 232)]},
    "pulse": {0: [(51, 90)], 1: [(41, 50), (91, 110)], 2: [(111, 130)], 3: [(32, 40), (131, 165)]},
    "temperature": {0: [(361, 380)], 1: [(351, 360), (381, 390)], 2: [(391, 406)], 3: [(336, 350)]},  # tenths
    "spo2_scale1": {0: [(96, 100)], 1: [(94, 95)], 2: [(92, 93)], 3: [(78, 91)]},
    "spo2_scale2_low": {0: [(88, 92)], 1: [(86, 87)], 2: [(84, 85)], 3: [(76, 83)]},
    "spo2_scale2_high_o2": {1: [(93, 94)], 2: [(95, 96)], 3: [(97, 100)]},
}
# Probability that a parameter is abnormal, per target band (rejection sampling then fixes the band).
_SEVERITY = {"zero": 0.0, "low": 0.25, "low-medium": 0.25, "medium": 0.45, "high": 0.7}


def _pick(rng: random.Random, ranges: list[tuple[int, int]]) -> int:
    low, high = rng.choice(ranges)
    return rng.randint(low, high)


def _abnormal_points(rng: random.Random, severity: float) -> int:
    """0, or with probability `severity` 1, 2 or 3 points (milder more often)."""
    if rng.random() >= severity:
        return 0
    return rng.choices((1, 2, 3), weights=(4, 3, 2))[0]


def _band_of(target: str, vitals: Vitals) -> bool:
    result = score(vitals)
    if target == "zero":
        return result.aggregate == 0
    return result.band == target and result.aggregate > 0


def _draw(rng: random.Random, target: str, scale: int) -> Vitals:
    severity = _SEVERITY[target]
    on_oxygen = rng.random() < severity * 0.8
    spo2_points = _abnormal_points(rng, severity)
    if scale == 1:
        spo2 = _pick(rng, _RANGES["spo2_scale1"][spo2_points])
    elif on_oxygen and spo2_points and rng.random() < 0.4:
        # over-oxygenation above the 88-92% target: scale 2 scores it
        spo2 = _pick(rng, _RANGES["spo2_scale2_high_o2"][spo2_points])
    else:
        spo2 = _pick(rng, _RANGES["spo2_scale2_low"][spo2_points])
        if not spo2_points and not on_oxygen and rng.random() < 0.3:
            spo2 = rng.randint(93, 97)  # above target on air scores 0 on scale 2
    consciousness = "A"
    if rng.random() < severity * 0.35:
        consciousness = rng.choice("CCCVVPU")
    return Vitals(
        resp_rate=_pick(rng, _RANGES["resp_rate"][_abnormal_points(rng, severity)]),
        spo2=spo2, spo2_scale=scale, on_oxygen=on_oxygen,
        systolic_bp=_pick(rng, _RANGES["systolic_bp"][_abnormal_points(rng, severity)]),
        pulse=_pick(rng, _RANGES["pulse"][_abnormal_points(rng, severity)]),
        consciousness=consciousness,
        temperature=_pick(rng, _RANGES["temperature"][_abnormal_points(rng, severity)]) / 10,
    )


def generate_patient(seed: int, index: int) -> dict[str, Any]:
    """One patient: deterministic for (seed, index), scored in the band its slot targets."""
    rng = random.Random(f"news2:{seed}:{index}")
    target = TARGETS[index % len(TARGETS)]
    scale = 2 if rng.random() < SCALE2_SHARE else 1
    for _ in range(MAX_DRAWS):
        vitals = _draw(rng, target, scale)
        if _band_of(target, vitals):
            break
    else:  # unreachable for these ranges; a clear failure beats a silently skewed mix
        raise SourceError(f"news2: could not draw a '{target}' patient for seed {seed}, index {index}")
    return {"id": f"p{index:06d}", "age": rng.randint(19, 96), "sex": rng.choice("FM"),
            "vitals": vitals.to_dict()}


# --- rendering
def _observations(v: Vitals) -> list[tuple[str, str]]:
    scale = ("Scale 2, hypercapnic respiratory failure, target 88–92%" if v.spo2_scale == 2 else "Scale 1")
    return [
        ("resp_rate", f"Respiration rate: {v.resp_rate} breaths/min"),
        ("spo2", f"SpO2: {v.spo2}% ({scale})"),
        ("air_or_oxygen", f"Air or oxygen: {'supplemental oxygen' if v.on_oxygen else 'room air'}"),
        ("systolic_bp", f"Systolic BP: {v.systolic_bp} mmHg"),
        ("pulse", f"Pulse: {v.pulse} beats/min"),
        ("consciousness", f"Consciousness: {_consciousness_text(v.consciousness)}"),
        ("temperature", f"Temperature: {v.temperature:.1f} °C"),
    ]


CONSCIOUSNESS = {"A": "Alert", "C": "new confusion", "V": "responds to voice", "P": "responds to pain",
                 "U": "unresponsive"}


def _consciousness_text(code: str) -> str:
    return CONSCIOUSNESS[code]


def _points(n: int) -> str:
    return f"{n} point{'s' if n != 1 else ''}"


def _band_sentence(result) -> str:
    if result.band == "high":
        reason = "aggregate 7 or more"
    elif result.band == "medium":
        reason = "aggregate 5–6, the key threshold for an urgent response"
    elif result.band == "low-medium":
        reason = "a score of 3 in a single parameter"
    elif result.aggregate == 0:
        reason = "aggregate 0"
    else:
        reason = "aggregate 1–4"
    return f"Clinical risk: {result.band} ({reason})."


def _response_lines(result) -> list[str]:
    return [_band_sentence(result),
            f"Response: {result.response}. {result.action}",
            f"Monitoring frequency: {result.monitoring}."]


def score_answer(v: Vitals) -> str:
    result = score(v)
    lines = ["NEWS2 chart (RCP 2017), parameter by parameter:"]
    for key, text in _observations(v):
        lines.append(f"- {text} → {_points(result.points[key])} ({result.ranges[key]})")
    lines.append(f"Aggregate NEWS2 score: {result.aggregate}")
    return "\n".join(lines + _response_lines(result))


def response_answer(v: Vitals) -> str:
    result = score(v)
    scoring = [f"{text.split(':')[0]} {result.points[key]}" for key, text in _observations(v) if result.points[key]]
    parts = ", ".join(scoring) if scoring else "no parameter scores"
    lines = [f"Scoring: {parts}.", f"Aggregate NEWS2 score: {result.aggregate}"]
    return "\n".join(lines + _response_lines(result))


def _handover(record: dict[str, Any], v: Vitals) -> str:
    oxygen = "on supplemental oxygen" if v.on_oxygen else "on room air"
    scale = (" Charted on SpO2 scale 2 (hypercapnic respiratory failure, target 88–92%)."
             if v.spo2_scale == 2 else "")
    sex = "woman" if record["sex"] == "F" else "man"
    return (f"Ward handover: {record['age']}-year-old {sex}. RR {v.resp_rate}/min, SpO2 {v.spo2}% {oxygen}, "
            f"BP systolic {v.systolic_bp} mmHg, HR {v.pulse}/min, {_consciousness_text(v.consciousness)}, "
            f"temperature {v.temperature:.1f} °C.{scale} What is the NEWS2 score, the clinical risk and the "
            f"recommended response?")


class News2Source(Source):
    kind = "news2"
    licence = "MIT (synthetic data generated by medforge; NEWS2 chart © Royal College of Physicians 2017)"
    origin = "synthetic:medforge-news2"
    PARAMS = {
        "count": Key(int, 1500, min=1),  # patients
        "seed": Key(int, 7),
    }

    def fetch(self, store) -> None:
        count = self.param("count")
        seed = self.param("seed")
        store.put(PAGE, io.jsonl_bytes(generate_patient(seed, i) for i in range(count)))

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        """The generator's own page: any row it could not have written (a damaged or edited copy) is an error."""
        fix = f"regenerate with `doit scrape:{self.name}`"
        for lineno, row in enumerate(io.read_jsonl(page, fix, SourceError), 1):
            where = f"{page}:{lineno}"
            if not isinstance(row, dict):
                raise SourceError(f"{where}: a patient is a JSON {type(row).__name__}, not an object; {fix}")
            if not isinstance(row.get("vitals"), dict):
                raise SourceError(f"{where}: a patient has no 'vitals' object; {fix}")
            try:
                vitals = Vitals.from_dict(row["vitals"])
            except KeyError as exc:
                raise SourceError(f"{where}: a patient's vitals lack {exc}; {fix}") from None
            try:
                score(vitals)  # every value of the right type and in the chart's domain
            except (ValueError, TypeError, OverflowError) as exc:
                raise SourceError(f"{where}: a patient's vitals cannot be scored ({exc}); {fix}") from None
            if not isinstance(vitals.temperature, (int, float)) or isinstance(vitals.temperature, bool) \
                    or vitals.consciousness not in CONSCIOUSNESS or vitals.spo2_scale not in (1, 2):
                raise SourceError(f"{where}: a patient's temperature, consciousness or spo2_scale is not a NEWS2 "
                                  f"value; {fix}")
            if not isinstance(row.get("id"), str) or not row["id"] or row.get("sex") not in ("F", "M") \
                    or not isinstance(row.get("age"), int) or isinstance(row.get("age"), bool):
                raise SourceError(f"{where}: a patient lacks a string 'id', 'sex' F or M, or a whole 'age'; {fix}")
            yield row

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        v = Vitals.from_dict(record["vitals"])
        question = ("Calculate the NEWS2 score for this ward patient and give the clinical risk and "
                    "recommended response.\n" + "\n".join(text for _, text in _observations(v)))
        yield {"task": "news2_score", "messages": [{"role": "user", "content": question},
                                                   {"role": "assistant", "content": score_answer(v)}]}
        yield {"task": "news2_response", "messages": [{"role": "user", "content": _handover(record, v)},
                                                      {"role": "assistant", "content": response_answer(v)}]}


SOURCE = News2Source
