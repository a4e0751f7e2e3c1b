"""news2: synthetic ward observations, scored exactly by the RCP NEWS2 chart (2017).

`fetch` generates `count` patients from `seed` into one raw JSONL page. Each patient
draws from its own generator (seed, index), so raising `count` only appends patients
and the earlier ones stay byte-identical. Patients cycle through target risk bands
(zero, low, low-medium, medium, high), so every band occurs even in a small run; the
chart, not the generator, decides every score.

The chart (`score()`) and the reading of an answer back (`parse_answer()`) are pure functions
in this file too: the templates build their answers from the chart, and eval (`tasks`) reads
a model's answer back and compares it with the chart's, all in one place.

params: count (patients, default 1500), seed (default 7).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from stages import io
from stages.sources import Key, Source, SourceError, Task


# --- the chart (RCP 2017)
# the chart's wording of each consciousness level (the answer's range label; CONSCIOUSNESS below is the prompt's)
ACVPU = {"A": "Alert", "C": "new Confusion", "V": "responds to Voice", "P": "responds to Pain", "U": "Unresponsive"}
PARAMETERS = ("resp_rate", "spo2", "air_or_oxygen", "systolic_bp", "pulse", "consciousness", "temperature")
# each parameter as the questions and answers name it
LABELS = {"resp_rate": "Respiration rate", "spo2": "SpO2", "air_or_oxygen": "Air or oxygen",
          "systolic_bp": "Systolic BP", "pulse": "Pulse", "consciousness": "Consciousness", "temperature": "Temperature"}
BANDS = ("low", "low-medium", "medium", "high")

# (points, label) per chart row, checked top to bottom with `value <= upper`; the last row catches the rest.
# Integers are whole numbers on the chart, so `<= 11` covers the row "9-11".
_RESP = ((8, 3, "≤8"), (11, 1, "9–11"), (20, 0, "12–20"), (24, 2, "21–24"), (None, 3, "≥25"))
_SPO2_SCALE1 = ((91, 3, "≤91"), (93, 2, "92–93"), (95, 1, "94–95"), (None, 0, "≥96"))
_SYSTOLIC = ((90, 3, "≤90"), (100, 2, "91–100"), (110, 1, "101–110"), (219, 0, "111–219"), (None, 3, "≥220"))
_PULSE = ((40, 3, "≤40"), (50, 1, "41–50"), (90, 0, "51–90"), (110, 1, "91–110"), (130, 2, "111–130"),
          (None, 3, "≥131"))
_TEMPERATURE = ((35.0, 3, "≤35.0"), (36.0, 1, "35.1–36.0"), (38.0, 0, "36.1–38.0"), (39.0, 1, "38.1–39.0"),
                (None, 2, "≥39.1"))

RESPONSES = {
    "zero": ("ward-based response", "minimum 12-hourly",
             "Continue routine NEWS2 monitoring."),
    "low": ("ward-based response", "minimum 4–6-hourly",
            "A registered nurse assesses the patient and decides whether increased frequency of monitoring "
            "and/or escalation of care is required."),
    "low-medium": ("urgent ward-based response", "minimum 1-hourly",
                   "A registered nurse informs the medical team caring for the patient, who reviews and decides "
                   "whether escalation of care is necessary."),
    "medium": ("urgent response (key threshold)", "minimum 1-hourly",
               "A registered nurse immediately informs the medical team caring for the patient; urgent "
               "assessment by a clinician or team with core competencies in the care of acutely ill patients; "
               "provide clinical care in an environment with monitoring facilities."),
    "high": ("emergency response", "continuous monitoring of vital signs",
             "A registered nurse immediately informs the medical team (at least specialist registrar level); "
             "emergency assessment by a team with critical-care competencies, including advanced airway "
             "management skills; consider transfer of care to a level 2 or 3 facility (HDU or ICU)."),
}


@dataclass(frozen=True)
class Vitals:
    resp_rate: int          # breaths/min
    spo2: int               # %
    spo2_scale: int         # 1, or 2 for hypercapnic respiratory failure (target 88-92%)
    on_oxygen: bool
    systolic_bp: int        # mmHg
    pulse: int              # beats/min
    consciousness: str      # A, C (new confusion), V, P or U
    temperature: float      # °C, one decimal

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Vitals":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Score:
    points: dict[str, int]     # per parameter, in PARAMETERS order
    ranges: dict[str, str]     # the chart row each parameter fell in
    aggregate: int
    single_three: bool         # a score of 3 in any one parameter
    band: str                  # low, low-medium, medium or high
    response: str
    monitoring: str
    action: str


def _whole(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"NEWS2 {name} must be a whole number (got {value!r})")
    return int(value)


def _row(table, value) -> tuple[int, str]:
    for upper, points, label in table:
        if upper is None or value <= upper:
            return points, label
    raise AssertionError("chart tables end with a catch-all row")


def spo2_points(spo2: int, scale: int, on_oxygen: bool) -> tuple[int, str]:
    if scale == 1:
        return _row(_SPO2_SCALE1, spo2)
    if scale != 2:
        raise ValueError(f"NEWS2 SpO2 scale must be 1 or 2 (got {scale!r})")
    # Scale 2: low saturations score as usual; above the 88-92% target only oxygen scores.
    low = ((83, 3, "≤83"), (85, 2, "84–85"), (87, 1, "86–87"), (92, 0, "88–92"))
    for upper, points, label in low:
        if spo2 <= upper:
            return points, label
    if not on_oxygen:
        return 0, "≥93 on air"
    return _row(((94, 1, "93–94 on oxygen"), (96, 2, "95–96 on oxygen"), (None, 3, "≥97 on oxygen")), spo2)


def score(vitals: Vitals | dict[str, Any]) -> Score:
    """Per-parameter points, aggregate, clinical risk band and response for one set of observations."""
    v = Vitals.from_dict(vitals) if isinstance(vitals, dict) else vitals
    consciousness = str(v.consciousness).strip().upper()[:1]
    if consciousness not in ACVPU:
        raise ValueError(f"NEWS2 consciousness must be one of A, C, V, P, U (got {v.consciousness!r})")
    # the chart's temperature rows are to one decimal: 36.04 reads 36.0
    temperature = round(float(v.temperature), 1)
    rows = {
        "resp_rate": _row(_RESP, _whole("resp_rate", v.resp_rate)),
        "spo2": spo2_points(_whole("spo2", v.spo2), v.spo2_scale, bool(v.on_oxygen)),
        "air_or_oxygen": (2, "oxygen") if v.on_oxygen else (0, "air"),
        "systolic_bp": _row(_SYSTOLIC, _whole("systolic_bp", v.systolic_bp)),
        "pulse": _row(_PULSE, _whole("pulse", v.pulse)),
        "consciousness": (0, "Alert") if consciousness == "A" else (3, ACVPU[consciousness]),
        "temperature": _row(_TEMPERATURE, temperature),
    }
    points = {k: rows[k][0] for k in PARAMETERS}
    aggregate = sum(points.values())
    single_three = 3 in points.values()
    if aggregate >= 7:
        band, key = "high", "high"
    elif aggregate >= 5:
        band, key = "medium", "medium"
    elif single_three:
        band, key = "low-medium", "low-medium"
    else:
        band, key = "low", "zero" if aggregate == 0 else "low"
    response, monitoring, action = RESPONSES[key]
    return Score(points=points, ranges={k: rows[k][1] for k in PARAMETERS}, aggregate=aggregate,
                 single_three=single_three, band=band, response=response, monitoring=monitoring, action=action)


# --- reading an answer back (eval)
_AGGREGATE_RE = re.compile(r"(?:aggregate|total)(?:\s+news2)?\s+score\s*(?:is|of|=|:)?\s*(\d{1,2})\b"
                           r"|news2(?:\s+score)?\s*(?:is|of|=|:)\s*(\d{1,2})\b", re.IGNORECASE)
_BAND_RE = re.compile(r"(?:clinical\s+)?risk(?:\s+band)?\s*(?:is|:|=)?\s*(low\s*[-–—]?\s*medium|low|medium|high)\b"
                      r"|\b(low\s*[-–—]\s*medium|low|medium|high)\s+(?:clinical\s+)?risk\b", re.IGNORECASE)


def normalize_band(text: str) -> str | None:
    words = re.sub(r"[\s\-–—]+", "-", text.strip().lower())
    return words if words in BANDS else None


def parse_answer(text: str) -> tuple[int | None, str | None]:
    """(aggregate score, risk band) stated in an answer, or None for what it does not state."""
    aggregate = band = None
    match = _AGGREGATE_RE.search(text)
    if match:
        aggregate = int(match.group(1) or match.group(2))
    match = _BAND_RE.search(text)
    if match:
        band = normalize_band(match.group(1) or match.group(2))
    return aggregate, band


def answered(text: str) -> bool:
    """An answer generation may stop at: it states the aggregate and the band (`grade` reads the first of
    each, so nothing after them changes either) and the band's line has ended ("low" cannot still become
    "low-medium"). The points per parameter come before them in the answers training teaches."""
    band = _BAND_RE.search(text)
    return band is not None and "\n" in text[band.end():] and _AGGREGATE_RE.search(text) is not None


# "- Pulse: 118 beats/min → 2 points (111–130)", one line per parameter (news2_score's answer)
_CHART_LINE_RE = {key: re.compile(rf"^[\s\-*]*{re.escape(label)}\b[^\n]*?(?:→|->|=>)\s*(\d)\s+points?\b",
                                  re.IGNORECASE | re.MULTILINE) for key, label in LABELS.items()}
# "Scoring: Pulse 2, Temperature 1." naming the parameters that score (news2_response's answer)
_SCORING_RE = re.compile(r"^\s*Scoring:([^\n]*)", re.IGNORECASE | re.MULTILINE)


def stated_points(text: str) -> dict[str, int]:
    """The points an answer gives each parameter: its chart lines, else its "Scoring:" line (where a parameter
    it does not name scores 0); a parameter it gives no points is absent."""
    points = {key: int(m.group(1)) for key, regex in _CHART_LINE_RE.items() if (m := regex.search(text))}
    if points:
        return points
    scoring = _SCORING_RE.search(text)
    if not scoring:
        return {}
    named = {key: re.search(rf"\b{re.escape(label)}\s+(\d)\b", scoring.group(1), re.IGNORECASE)
             for key, label in LABELS.items()}
    return {key: int(m.group(1)) if m else 0 for key, m in named.items()}


GRADE_RATES = frozenset({"stated_rate", "aggregate_accuracy", "band_accuracy", "points_accuracy"})  # grade's rates
CLOZE_RATES = frozenset({"cloze_points", "cloze_aggregate", "cloze_band"})
_GOLD_AGGREGATE_RE = re.compile(r"^Aggregate NEWS2 score: (\d+)", re.MULTILINE)
_GOLD_BAND_RE = re.compile(r"^Clinical risk: (low-medium|low|medium|high)\b", re.MULTILINE)


def cloze_spans(gold: str) -> list[tuple[str, int, int]]:
    """Where a gold answer states each parameter's points (chart lines, or the Scoring line's numbers), the
    aggregate and the band: what a model that learned the chart predicts, given the answer so far."""
    spans = [("cloze_points", *m.span(1)) for regex in _CHART_LINE_RE.values() if (m := regex.search(gold))]
    scoring = _SCORING_RE.search(gold)
    if not spans and scoring:
        start = scoring.start(1)
        spans = [("cloze_points", start + m.start(1), start + m.end(1))
                 for m in re.finditer(r"\b(\d)\b", scoring.group(1))]
    spans += [(name, *m.span(1)) for name, regex in (("cloze_aggregate", _GOLD_AGGREGATE_RE),
                                                     ("cloze_band", _GOLD_BAND_RE)) if (m := regex.search(gold))]
    return spans


def grade(gold: str, answer: str) -> dict[str, float]:
    """One generated answer against the gold one (the chart's): did it state a score, is it the chart's
    aggregate and band, how far off is the aggregate (only where both state one), and the share of the seven
    parameters it gives the chart's points (a parameter it gives none counts as wrong)."""
    want_agg, want_band = parse_answer(gold)
    got_agg, got_band = parse_answer(answer)
    out = {"stated_rate": float(got_agg is not None), "aggregate_accuracy": float(got_agg == want_agg),
           "band_accuracy": float(got_band is not None and got_band == want_band)}
    if got_agg is not None and want_agg is not None:
        out["aggregate_mae"] = float(abs(got_agg - want_agg))
    want_points, got_points = stated_points(gold), stated_points(answer)
    if len(want_points) == len(PARAMETERS):
        out["points_accuracy"] = sum(got_points.get(k) == v for k, v in want_points.items()) / len(PARAMETERS)
    return out


# --- the generator
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
    values = {"resp_rate": f"{v.resp_rate} breaths/min", "spo2": f"{v.spo2}% ({scale})",
              "air_or_oxygen": "supplemental oxygen" if v.on_oxygen else "room air",
              "systolic_bp": f"{v.systolic_bp} mmHg", "pulse": f"{v.pulse} beats/min",
              "consciousness": _consciousness_text(v.consciousness), "temperature": f"{v.temperature:.1f} °C"}
    return [(key, f"{LABELS[key]}: {values[key]}") for key in PARAMETERS]


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
    scoring = [f"{LABELS[key]} {result.points[key]}" for key in PARAMETERS if result.points[key]]
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
    # greedy tokens per answer: the longest gold answers plus room
    tasks = {"news2_score": Task(300, grade, rates=GRADE_RATES | CLOZE_RATES, cloze=cloze_spans, answered=answered),
             "news2_response": Task(150, grade, rates=GRADE_RATES | CLOZE_RATES, cloze=cloze_spans,
                                    answered=answered)}

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
