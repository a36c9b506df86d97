"""Versioned prompt templates (the files under rubrics/): load, validate the declared fields, render to chat messages.

The policy's trace is untrusted text (SPEC §9): it is rendered inside a fence whose marker is random per request,
and anything in it that could close or imitate that fence, or pass for a `Score:` line, is escaped visibly.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
import secrets
import unicodedata

RUBRICS_DIR = pathlib.Path(__file__).resolve().parents[2] / "rubrics"
KINDS = ("judge", "policy", "rubric")  # a judge call / a policy-side prompt / the rubric-building judge call
ROLES = ("system", "user")  # message sections, in this order
FENCE_BUILTINS = ("fence_open", "fence_close")  # placeholders naming the fence lines, for the system prompt
ESCAPE_PREFIX = "[escaped] "  # put before every trace line that was neutralised
FENCE_TOKEN_BYTES = 16  # 32 hex digits: guessing the marker is hopeless, and it is replaced anyway if it appears

_TAG = re.compile(r"\{\{([#^/]?)([a-z_][a-z0-9_]*)\}\}")
_SECTION = re.compile(r"\{\{([#^])([a-z_][a-z0-9_]*)\}\}(.*?)\{\{/\2\}\}", re.S)
_ROLE_LINE = re.compile(r"^=== ([a-z]+) ===[ \t]*$", re.M)
_FILE_NAME = re.compile(r"^([a-z0-9][a-z0-9-]*)\.v([0-9]+)\.txt$")
_NAME_LIST = re.compile(r"^[a-z_][a-z0-9_]*$")
# What the policy could write to imitate a fence line: `<<` then END / TRACE / a hex run, or a hex run then `>>`.
# (`cout << endl` is not fence-like: a trace full of code must stay readable.)
_FENCE_LIKE = re.compile(
    r"<\s*<\s*[/\\]?\s*(?:end(?![a-z0-9])|end[\s_-]*trace|trace|[0-9a-f]{8})|[0-9a-f]{8}\s*>\s*>", re.I)
_SCORE_LIKE = re.compile(r"score\s*[:=]", re.I)


class TemplateError(ValueError):
    """A malformed template file, or a render call with a missing or unknown field."""


@dataclasses.dataclass(frozen=True)
class Template:
    """One parsed template file. `fields` must be given to `render`; `optional` may be; `untrusted` is fenced."""

    id: str
    version: int
    kind: str
    fields: tuple[str, ...]
    optional: tuple[str, ...]
    untrusted: str | None
    sections: tuple[tuple[str, str], ...]  # (role, body) in message order
    description: str = ""

    @property
    def key(self) -> str:
        return f"{self.id}.v{self.version}"

    def render(self, **values: str | None) -> list[dict[str, str]]:
        """Returns chat messages. An optional field given as None or blank text counts as absent."""
        declared = self.fields + self.optional
        for name, value in values.items():
            if name not in declared:
                raise TemplateError(f"template {self.key}: unknown field {name!r} (declares {', '.join(declared)})")
            if value is not None and not isinstance(value, str):
                raise TemplateError(f"template {self.key}: field {name!r} must be str, got {type(value).__name__}")
        for name in self.fields:
            if values.get(name) is None:
                raise TemplateError(f"template {self.key}: missing field {name!r}")
        present = {name: value for name, value in values.items()
                   if value is not None and (name in self.fields or value.strip())}
        fill = dict.fromkeys(self.optional, "") | present
        if self.untrusted is not None:
            token = new_fence_token()
            fence_open, fence_close = fence_lines(self.untrusted, token)
            body = neutralise_untrusted(present[self.untrusted], token)
            fill[self.untrusted] = f"{fence_open}\n{body}\n{fence_close}" if body else f"{fence_open}\n{fence_close}"
            fill.update(fence_open=fence_open, fence_close=fence_close)
        messages = []
        for role, body in self.sections:
            text = _resolve_sections(body, present)
            # One substitution pass over template text only: inserted values are never scanned for tags.
            text = _TAG.sub(lambda match: fill[match.group(2)], text)
            messages.append({"role": role, "content": text})
        return messages


def new_fence_token() -> str:
    """The per-request random part of the fence marker (tests replace this to plant the real marker in a trace)."""
    return secrets.token_hex(FENCE_TOKEN_BYTES)


def fence_lines(field: str, token: str) -> tuple[str, str]:
    label = field.upper().replace("_", "-")
    return f"<<{label}-{token}>>", f"<<END-{label}-{token}>>"


def neutralise_untrusted(text: str, token: str) -> str:
    """Makes untrusted text safe to put between fence lines (SPEC §9).

    Line breaks of every kind become a plain newline, so the judge and this code agree on what a line is. The
    marker token is replaced wherever it occurs. A line that looks like a fence line or contains `score:` gets
    ESCAPE_PREFIX and has every `<<` / `>>` broken up, so no line inside the fence starts like a fence line or
    reads as `Score: N`.
    """
    out = []
    for line in text.splitlines():
        line = re.sub(re.escape(token), "[marker removed]", line, flags=re.I)
        folded = _fold(line)
        if _FENCE_LIKE.search(folded) or _SCORE_LIKE.search(folded):
            line = ESCAPE_PREFIX + re.sub(r">(?=>)", ">\\\\", re.sub(r"<(?=<)", "<\\\\", line))
        out.append(line)
    return "\n".join(out)


def _fold(line: str) -> str:
    """A lookalike-insensitive view of a line: NFKC (fullwidth `＜` → `<`), no invisible format characters
    (zero-width joiners and the like), no Markdown emphasis marks."""
    line = unicodedata.normalize("NFKC", line)
    return "".join(c for c in line if unicodedata.category(c) != "Cf" and c not in "*_`")


def _resolve_sections(body: str, present: dict[str, str]) -> str:
    """`{{#name}}…{{/name}}` keeps its text when `name` is present, `{{^name}}…{{/name}}` when it is absent."""
    def keep(match: re.Match) -> str:
        wanted = match.group(1) == "#"
        return match.group(3) if (match.group(2) in present) == wanted else ""
    text = _SECTION.sub(keep, body)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def parse_template(text: str, source: str = "<string>") -> Template:
    """Parses and validates one template file: a `key: value` header, then `=== system ===` / `=== user ===`."""
    def fail(message: str):
        raise TemplateError(f"{source}: {message}")

    parts = _ROLE_LINE.split(text)
    header_text, bodies = parts[0], list(zip(parts[1::2], parts[2::2]))
    header = {}
    for line in header_text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if not sep or name.strip() in header:
            fail(f"bad or repeated header line {line!r}")
        header[name.strip()] = value.strip()
    unknown = set(header) - {"id", "version", "kind", "fields", "optional", "untrusted", "description"}
    if unknown:
        fail(f"unknown header keys {sorted(unknown)}")
    for name in ("id", "version", "kind", "fields"):
        if not header.get(name):
            fail(f"header is missing {name!r}")
    if not header["version"].isdigit() or int(header["version"]) < 1:
        fail(f"version must be a positive integer, got {header['version']!r}")
    if header["kind"] not in KINDS:
        fail(f"kind must be one of {KINDS}, got {header['kind']!r}")
    fields = _names(header["fields"], fail)
    optional = _names(header.get("optional", ""), fail)
    untrusted = header.get("untrusted") or None
    if set(fields) & set(optional):
        fail("a field is both required and optional")
    if untrusted is not None and untrusted not in fields:
        fail(f"untrusted field {untrusted!r} must be a required field")
    if header["kind"] == "judge" and untrusted is None:
        fail("a judge template must fence its trace (declare `untrusted:`)")

    roles = [role for role, _ in bodies]
    if "user" not in roles or any(r not in ROLES for r in roles) or roles != sorted(set(roles), key=ROLES.index):
        fail(f"sections must be an optional `=== system ===` then `=== user ===`, got {roles}")
    allowed = set(fields) | set(optional) | (set(FENCE_BUILTINS) if untrusted else set())
    used = set()
    for role, body in bodies:
        tags = _TAG.findall(body)
        if body.count("{{") != len(tags):
            fail(f"{role}: malformed tag (tags are {{{{name}}}}, {{{{#name}}}}, {{{{^name}}}}, {{{{/name}}}})")
        _check_nesting(tags, role, fail)
        for _, name in tags:
            if name not in allowed:
                fail(f"{role}: tag {name!r} is not a declared field")
            used.add(name)
    unused = (set(fields) | set(optional)) - used
    if unused:
        fail(f"declared but unused fields {sorted(unused)}")
    if untrusted is not None:
        user_body = dict(bodies)["user"]
        whole_line = re.compile(r"^\{\{" + untrusted + r"\}\}$", re.M)
        total = sum(body.count("{{" + untrusted + "}}") for _, body in bodies)
        if total != 1 or len(whole_line.findall(_SECTION.sub("", user_body))) != 1:
            fail(f"untrusted field {untrusted!r} must appear once, alone on a line of the user section, "
                 "outside conditional sections")
    if header["kind"] == "judge" and "Score: N" not in dict(bodies).get("system", ""):
        fail("a judge template's system prompt must state the `Score: N` output contract")
    return Template(id=header["id"], version=int(header["version"]), kind=header["kind"], fields=fields,
                    optional=optional, untrusted=untrusted, sections=tuple(bodies),
                    description=header.get("description", ""))


def _names(value: str, fail) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    for name in names:
        if not _NAME_LIST.match(name) or name in FENCE_BUILTINS:
            fail(f"bad field name {name!r}")
    if len(set(names)) != len(names):
        fail(f"repeated field in {value!r}")
    return names


def _check_nesting(tags, role, fail) -> None:
    open_name = None  # sections do not nest: one level is all the templates need
    for sigil, name in tags:
        if sigil in ("#", "^"):
            if open_name is not None:
                fail(f"{role}: section {name!r} opened inside section {open_name!r}")
            open_name = name
        elif sigil == "/":
            if open_name != name:
                fail(f"{role}: {{{{/{name}}}}} closes {open_name!r}")
            open_name = None
    if open_name is not None:
        fail(f"{role}: section {open_name!r} is never closed")


def load_template_file(path: str | pathlib.Path) -> Template:
    path = pathlib.Path(path)
    match = _FILE_NAME.match(path.name)
    if not match:
        raise TemplateError(f"{path}: file name must be <id>.v<version>.txt")
    template = parse_template(path.read_text(encoding="utf-8"), str(path))
    if (template.id, template.version) != (match.group(1), int(match.group(2))):
        raise TemplateError(f"{path}: header says {template.key}, file name says {match.group(1)}.v{match.group(2)}")
    return template


@functools.lru_cache(maxsize=None)
def list_templates(directory: str | pathlib.Path = RUBRICS_DIR) -> tuple[Template, ...]:
    """Every template file in `directory`, sorted by (id, version)."""
    paths = sorted(pathlib.Path(directory).glob("*.txt"))
    return tuple(sorted((load_template_file(p) for p in paths), key=lambda t: (t.id, t.version)))


def load_template(template_id: str, version: int | None = None,
                  directory: str | pathlib.Path = RUBRICS_DIR) -> Template:
    """The template `template_id` at `version`, or at its highest version when `version` is None."""
    found = [t for t in list_templates(directory) if t.id == template_id]
    if version is not None:
        found = [t for t in found if t.version == version]
    if not found:
        wanted = template_id if version is None else f"{template_id}.v{version}"
        raise TemplateError(f"no template {wanted} in {directory}")
    return found[-1]


def prompt_messages_text(tokenizer, messages: list[dict]) -> str:
    """A policy-side prompt from chat messages: the tokenizer's chat template when it has one, else the contents."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"
