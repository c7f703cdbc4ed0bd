"""Rules: sandboxed conditions over DICOM attributes; every decision can explain itself.

Conditions are Python-like expressions evaluated by simpleeval (no ``eval``): names are DICOM
keywords of the series' first instance (``Modality``, ``SliceThickness``...) plus
``CallingAETitle``. A missing attribute is ``None``; comparing it makes the rule not match,
and the explanation says which attribute was missing.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Mapping

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from simpleeval import EvalWithCompoundTypes, InvalidExpression

from .config import Rule
from .errors import ConfigError
from .volume import frame_attribute

#: names a rule may use besides DICOM keywords
EXTRA_NAMES = ("CallingAETitle",)
#: attributes whose values never appear in explanations or logs
PHI_KEYWORDS = frozenset(
    {"PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientAddress",
     "PatientMotherBirthName", "PatientTelephoneNumbers", "IssuerOfPatientID", "AccessionNumber",
     "ReferringPhysicianName", "InstitutionAddress", "PatientBirthName", "MedicalRecordLocator"}
)

FUNCTIONS = {
    "lower": lambda s: str(s or "").lower(),
    "upper": lambda s: str(s or "").upper(),
    "contains": lambda s, part: str(part).lower() in str(s or "").lower(),
    "startswith": lambda s, prefix: str(s or "").lower().startswith(str(prefix).lower()),
    "float": float,
    "int": int,
    "str": str,
    "len": len,
}


def _names_in(expression: str) -> list[str]:
    tree = ast.parse(expression, mode="eval")
    seen: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in seen and node.id not in FUNCTIONS and node.id not in ("True", "False", "None"):
            seen.append(node.id)
    return seen


def _python_value(value: Any) -> Any:
    if isinstance(value, MultiValue | list | tuple):
        return tuple(_python_value(v) for v in value)
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace")
    if value is None:
        return None
    return str(value) if not isinstance(value, str) else value


def attributes_of(ds: Dataset, names: list[str], calling_ae: str = "") -> dict[str, Any]:
    """The values of ``names`` in ``ds`` as plain Python values (None when absent or empty); of
    a multi-frame image, a frame attribute (SliceThickness, RepetitionTime, ...) is its first
    frame's, from the functional groups."""
    values: dict[str, Any] = {}
    for name in names:
        if name == "CallingAETitle":
            values[name] = calling_ae
            continue
        element = ds.get(name)
        if element is None and "PerFrameFunctionalGroupsSequence" in ds:  # Enhanced MR / CT: per frame
            element = frame_attribute(ds, name)
        values[name] = None if element is None or element == "" else _python_value(element)
    return values


def shown(name: str, value: Any) -> str:
    return f"{name}=<redacted>" if name in PHI_KEYWORDS else f"{name}={value!r}"


@dataclass(frozen=True)
class Decision:
    rule: Rule
    matched: bool
    reason: str


class CompiledRule:
    def __init__(self, rule: Rule, index: int) -> None:
        self.rule = rule
        try:
            tree = ast.parse(rule.when, mode="eval")
        except SyntaxError as exc:
            raise ConfigError(f"rules[{index}].when", f"syntax error in {rule.when!r}: {exc.msg}") from None
        self.names = _names_in(rule.when)
        unknown = [n for n in self.names if n not in EXTRA_NAMES and tag_for_keyword(n) is None]
        if unknown:
            raise ConfigError(f"rules[{index}].when", f"{unknown[0]!r} is not a DICOM keyword (nor CallingAETitle)")
        # Top-level 'and' clauses are checked one by one so a miss names the clause that failed.
        body = tree.body
        if isinstance(body, ast.BoolOp) and isinstance(body.op, ast.And):
            self.clauses = [ast.unparse(v) for v in body.values]
        else:
            self.clauses = [rule.when]

    def _eval(self, expression: str, values: Mapping[str, Any]) -> Any:
        evaluator = EvalWithCompoundTypes(names=dict(values), functions=FUNCTIONS)
        return evaluator.eval(expression)

    def decide(self, values: Mapping[str, Any]) -> Decision:
        try:
            matched = bool(self._eval(self.rule.when, values))
            if matched:
                return Decision(self.rule, True, "matched: " + ", ".join(shown(n, values.get(n)) for n in self.names))
            failing = next((c for c in self.clauses if not self._safe_bool(c, values)), self.rule.when)
        except (TypeError, ValueError, InvalidExpression, ArithmeticError) as exc:
            missing = [n for n in self.names if values.get(n) is None]
            if missing:
                return Decision(self.rule, False, f"no match: {', '.join(missing)} missing in the series")
            return Decision(self.rule, False, f"no match: condition could not be evaluated ({type(exc).__name__}: {exc})")
        used = _names_in(failing)
        detail = ", ".join(shown(n, values.get(n)) for n in used) or "no attributes"
        return Decision(self.rule, False, f"no match: {failing!r} is false with {detail}")

    def _safe_bool(self, clause: str, values: Mapping[str, Any]) -> bool:
        try:
            return bool(self._eval(clause, values))
        except Exception:  # noqa: BLE001 - a clause that cannot be evaluated did not hold
            return False


class Router:
    """Evaluates every rule against a series; all matching rules make jobs."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = [CompiledRule(rule, i) for i, rule in enumerate(rules)]
        self.names = sorted({n for r in self.rules for n in r.names})

    def decide(self, first_instance: Dataset, calling_ae: str = "") -> list[Decision]:
        values = attributes_of(first_instance, self.names, calling_ae)
        return [rule.decide(values) for rule in self.rules]
