"""Transaction (all-or-nothing) and batch (each entry alone) Bundles."""

from __future__ import annotations

import copy
import re
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import structlog

from ccm_ingest.adapters.repository import SqlResourceRepository
from ccm_ingest.domain.mapping import local_path, reference
from ccm_ingest.domain.model import (
    RESOURCE_ID,
    SUPPORTED_TYPES,
    FhirRejected,
    Issue,
    Relocating,
    rejected,
)
from ccm_ingest.domain.rules import (
    OID_URN,
    UUID_URN,
    subject_targets,
    unresolved_local_references,
)
from ccm_ingest.service_layer import resources as handlers
from ccm_ingest.service_layer.resources import Caller, Outcome
from ccm_shared.db import UnitOfWork, gave_way
from ccm_shared.ids import random_uuid

log = structlog.get_logger(__name__)

METHOD_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}


@dataclass
class Entry:
    """One Bundle entry, checked: method, target type, id or criteria, resource."""

    index: int
    method: str
    rtype: str
    rid: str | None
    criteria: str | None
    resource: dict[str, Any] | None
    full_url: str | None
    if_none_exist: str | None
    if_match: str | None
    query: str = ""
    # A batch entry that failed its own checks, or a GET whose URL reads nothing served here
    # (in a transaction too: a read never fails the Bundle): answered with this, never run.
    refused: FhirRejected | None = None
    # GET Type/id/_history: "" (the resource's history), or the version it names (vread).
    history: str | None = None
    # A read's or vread's preconditions (request.ifNoneMatch, request.ifModifiedSince), as
    # sent: checked when the entry runs (a read never fails the Bundle: its own 400).
    if_none_match: Any = None
    if_modified_since: Any = None
    # A conditional create (transaction) whose criteria an existing resource matched (``found``)
    # or an earlier entry of the Bundle claimed (``same_as``): it writes nothing.
    found: Outcome | None = None
    same_as: Entry | None = None
    # A conditional create or update of a transaction whose criteria matched nothing: it
    # creates (so what it sends must meet them, ``_refuse_unmet``); its normalised criteria.
    creates: bool = False
    criteria_params: list[tuple[str, str]] | None = None


def _where(index: int) -> str:
    return f"Bundle.entry[{index}]"


# FHIR's uuid and oid types as a fullUrl (as references take them).
_UUID_URN = re.compile(UUID_URN)
_OID_URN = re.compile(OID_URN)
# A URI scheme (RFC 3986): what an absolute request.url starts with (http:, https:, urn:).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
# The Bundle types that may carry entry.response (bdl-4).
_WITH_RESPONSES = ("batch-response", "transaction-response", "history")


def parse_entries(bundle: dict[str, Any], max_entries: int, *,
                  each_alone: bool = False) -> list[Entry]:
    """Every entry checked and validated; all problems reported at once (422). ``each_alone``
    (a batch): an entry's own problems only refuse that entry (``Entry.refused``); the Bundle's
    own invariants (bdl-1, bdl-2, bdl-4, bdl-7) refuse the whole Bundle, a batch too."""
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise rejected(400, "structure", "Bundle.entry must be a list", "Bundle.entry")
    if len(entries) > max_entries:
        raise rejected(413, "too-costly", f"Bundle has {len(entries)} entries; the limit is "
                       f"{max_entries}", "Bundle.entry")
    _unique_full_urls(entries)
    kind = bundle.get("type")
    invariants = []  # the Bundle's (bdl-1, bdl-2, bdl-4): a Bundle breaking them is refused
    if "total" in bundle and kind not in ("searchset", "history"):
        invariants.append(Issue("error", "invariant", "Bundle.total is only allowed in a "
                                f"searchset or history Bundle, not in a {kind!r} one (bdl-1)",
                                ("Bundle.total",)))
    parsed, issues = [], []
    for i, raw in enumerate(entries):
        if isinstance(raw, dict):
            if "search" in raw and kind != "searchset":
                invariants.append(Issue(
                    "error", "invariant", "entry.search is only allowed in a searchset "
                    f"Bundle, not in a {kind!r} one (bdl-2)", (f"{_where(i)}.search",)))
            if "response" in raw and kind not in _WITH_RESPONSES:
                invariants.append(Issue(
                    "error", "invariant", "entry.response is only allowed in a "
                    f"batch-response, transaction-response or history Bundle, not in a {kind!r} "
                    "one (bdl-4): a request's entries carry entry.request", (
                        f"{_where(i)}.response",)))
        try:
            parsed.append(_parse_entry(i, raw))
        except FhirRejected as exc:
            if each_alone:
                parsed.append(Entry(i, "", "", None, None, None, None, None, None,
                                    refused=exc))
            else:
                issues += exc.issues  # already located at their entry
    if invariants or issues:
        raise FhirRejected(422, invariants + issues)
    return parsed


def _unique_full_urls(entries: list[Any]) -> None:
    """bdl-7: no two entries with the same fullUrl (and the same meta.versionId)."""
    seen: dict[tuple[str, Any], int] = {}
    issues = []
    for i, raw in enumerate(entries):
        url = raw.get("fullUrl") if isinstance(raw, dict) else None
        if not isinstance(url, str):
            continue
        request = raw.get("request")
        method = request.get("method") if isinstance(request, dict) else None
        # Only a create's or update's resource counts (a DELETE's or GET's is not looked at).
        resource = raw.get("resource") if method in ("POST", "PUT") else None
        meta = resource.get("meta") if isinstance(resource, dict) else None
        # repr: a versionId of any JSON type (a list is unhashable; validation refuses it later)
        key = (url, repr(meta.get("versionId")) if isinstance(meta, dict) else None)
        if key in seen:
            issues.append(Issue("error", "invariant", f"fullUrl {url!r} is also the fullUrl of "
                                f"Bundle.entry[{seen[key]}] (bdl-7: fullUrl must be unique in a "
                                "Bundle)", (f"{_where(i)}.fullUrl",)))
        else:
            seen[key] = i
    if issues:
        raise FhirRejected(422, issues)


def _parse_entry(i: int, raw: Any) -> Entry:
    if not isinstance(raw, dict) or not isinstance(raw.get("request"), dict):
        raise rejected(422, "required", "entry.request (method and url) is required",
                       f"{_where(i)}.request")
    request = raw["request"]
    method, url = request.get("method"), request.get("url")
    if not isinstance(method, str):  # a list or an object is no method (and unhashable)
        method = None
    if method in ("PATCH", "HEAD"):
        raise rejected(422, "not-supported", f"entry.request.method {method} is not supported "
                       f"here; supported: {', '.join(METHOD_ORDER)}", f"{_where(i)}.request.method")
    if method not in METHOD_ORDER or not isinstance(url, str) or not url:
        raise rejected(422, "value", f"entry.request needs a method ({', '.join(METHOD_ORDER)}) "
                       "and a url", f"{_where(i)}.request")
    path, _, query = url.partition("?")
    if _SCHEME.match(path):  # http://host/fhir/Patient, urn:…: not this server's Type
        raise rejected(422, "value", f"{method} {url}: a Bundle entry's request.url is relative "
                       "to the base the Bundle is posted to: Type, Type/id or Type?criteria, "
                       "not an absolute URL", f"{_where(i)}.request.url")
    parts = path.strip("/").split("/")
    rtype = parts[0]
    if rtype not in SUPPORTED_TYPES:
        raise rejected(422, "not-supported", f"{method} {url}: resource type {rtype!r} (or "
                       f"operation) is not supported; supported: {', '.join(SUPPORTED_TYPES)}",
                       f"{_where(i)}.request.url")
    if method == "POST" and query:
        # Its criteria were dropped: each push of the entry created one more resource.
        raise rejected(422, "value", f"POST {url}: a create's url is the type alone; a "
                       "conditional create sends its criteria in request.ifNoneExist "
                       f"({rtype} with ifNoneExist {query!r})", f"{_where(i)}.request.url")
    refused: FhirRejected | None = None
    try:
        rid, history = _target(i, method, url, parts)
    except FhirRejected as exc:
        if method != "GET":
            raise
        # A read of something not served here is answered 400, as the REST URL is; in a
        # transaction too, for a GET never fails the Bundle.
        rid, history, refused = None, None, FhirRejected(400, exc.issues)
    for field, value in (("fullUrl", raw.get("fullUrl")),
                         ("request.ifMatch", request.get("ifMatch")),
                         ("request.ifNoneExist", request.get("ifNoneExist"))):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            # An empty ifNoneExist made a plain create (a duplicate on every push).
            raise rejected(422, "value", f"entry.{field} must be a non-empty string",
                           f"{_where(i)}.{field}")
    full_url = raw.get("fullUrl")
    if full_url is not None and full_url.startswith("urn:") and not (
            _UUID_URN.fullmatch(full_url) if full_url.startswith("urn:uuid:")
            else _OID_URN.fullmatch(full_url) if full_url.startswith("urn:oid:") else True):
        raise rejected(422, "value", f"fullUrl {full_url!r} is no "
                       + ("urn:uuid: followed by a UUID (8-4-4-4-12 hexadecimal digits, e.g. "
                          "urn:uuid:c757873d-ec9a-4326-a141-556f43239520)"
                          if full_url.startswith("urn:uuid:") else
                          "urn:oid: followed by an OID (e.g. urn:oid:1.2.840.113619.6.197)"),
                       f"{_where(i)}.fullUrl")
    # Only a create or update stores a resource: one sent with a DELETE or GET means nothing
    # here and is not looked at (it was, and one that was no JSON object answered 500).
    resource = None
    if method in ("POST", "PUT"):
        if raw.get("resource") is None:
            raise rejected(422, "required", f"{method} {url}: Bundle.entry[{i}].resource is "
                           "required for POST/PUT (the resource to create or update)",
                           f"{_where(i)}.resource")
        try:
            resource = handlers.validated(raw.get("resource"), rtype)
        except FhirRejected as exc:
            raise FhirRejected(exc.status, [issue.located(f"{_where(i)}.resource")
                                            for issue in exc.issues]) from None
    entry = Entry(i, method, rtype, rid, query or None, resource, raw.get("fullUrl"),
                  request.get("ifNoneExist"), request.get("ifMatch"), query, refused=refused,
                  history=history)
    if method == "GET":  # only a read takes them (FHIR: conditional read)
        entry.if_none_match = request.get("ifNoneMatch")
        entry.if_modified_since = request.get("ifModifiedSince")
    return entry


def _target(i: int, method: str, url: str, parts: list[str]) -> tuple[str | None, str | None]:
    """(the id, and for ``GET Type/id/_history[/vid]`` the version or "") an entry's url names
    after its type; 422 for any other url."""
    history = None
    if method == "GET" and len(parts) in (3, 4) and parts[2] == "_history":
        history = parts[3] if len(parts) == 4 else ""  # vread, history
    elif len(parts) > 2 or (len(parts) == 2 and (method == "POST" or not parts[1])):
        # Type/id/$op, POST Type/id, and any write of Type/id/_history/1 (a DELETE of it had
        # deleted the whole resource): no such interaction here.
        raise rejected(422, "not-supported", f"{method} {url}: a Bundle entry's url is Type, "
                       "Type/id or Type?criteria (POST: Type; GET also Type/id/_history and "
                       "Type/id/_history/vid); other history and operations are not supported "
                       "inside a Bundle", f"{_where(i)}.request.url")
    rid = parts[1] if len(parts) > 1 else None
    if rid is not None and (not RESOURCE_ID.match(rid) or rid in (".", "..")):
        raise rejected(422, "value", f"{method} {url}: the id must be 1-64 letters, digits, '-' "
                       "or '.' (and not '.' or '..')", f"{_where(i)}.request.url")
    return rid, history


CONDITIONAL, UNRESOLVED = 1, 2


def _rewrite_references(value: Any, ids: dict[str, str],
                        named: Callable[[str], str | None] | None = None) -> int:
    """Point references to fullUrls of this Bundle at their server ids, in place (and, with
    ``named``, those it finds an entry for in other words: ``_FullUrls.named_from``); what is
    left to do: ``CONDITIONAL`` (a ``Type?criteria`` reference to resolve), ``UNRESOLVED`` (a
    ``urn:`` reference that names no entry), or both, or 0."""
    left = 0
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            if named is not None and (target := named(ref)) is not None:
                value["reference"] = ref = target
            if ref in ids:
                value["reference"] = ids[ref]
            elif ref.startswith("urn:"):
                left |= UNRESOLVED
            elif "?" in ref:
                left |= CONDITIONAL
        for item in value.values():
            if isinstance(item, (dict, list)):
                left |= _rewrite_references(item, ids, named)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)):
                left |= _rewrite_references(item, ids, named)
    return left


# The [type]/[id] a RESTful fullUrl ends with (FHIR: such a fullUrl is [base]/[type]/[id]).
_RESTFUL_TAIL = re.compile(r"/[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")
_HISTORY = "/_history/"


class _FullUrls:
    """What names a Bundle's entries (FHIR bundle.html, "Resolving references in Bundles"):
    ``ids``, each fullUrl → the ``Type/id`` its entry has on this server, all that a Bundle of
    ``urn:uuid:`` fullUrls needs; and in one with RESTful fullUrls (``[base]/Type/id``), what
    names those in other words. A relative reference (``Patient/a``) is relative to the base of
    its entry's RESTful fullUrl, or to this server's base when that fullUrl is a ``urn:`` or
    absent, and names the entry whose fullUrl is that base followed by it (this server's base
    in whatever form a fullUrl gives it, scheme and default port aside, as absolute references
    are compared). A version-specific one (``…/Patient/a/_history/1``) names the entry its URL
    without the version names.

    FHIR: version-specific references stay version-specific once rewritten. One to an entry
    that creates (POST) names the version that entry results in: 1 of what it creates, or the
    current version of the stored resource a conditional create finds. One to an update (PUT)
    keeps the version it gives: which version an update makes is known only once written (the
    same content makes none), after references are rewritten."""

    __slots__ = ("_bases", "_local_bases", "_versions", "ids")

    def __init__(self, ids: dict[str, str], entries: list[Entry],
                 local_bases: tuple[str, ...]) -> None:
        self.ids = ids
        self._local_bases = local_bases
        self._bases: dict[str | None, dict[str, str]] | None = None
        self._versions: dict[str, str] = {}
        restful = [(url, parts) for url in ids if (parts := _restful(url)) is not None]
        if not restful:
            return
        # base → {Type/id: fullUrl}; None: this server's base, in whatever form a fullUrl
        # gives it (its scheme, a default port: as absolute references are compared)
        self._bases = {None: {}}
        for url, (base, tail) in restful:
            self._bases.setdefault(base, {})[tail] = url
            if (local := local_path(url, local_bases)) is not None:
                self._bases[None].setdefault(local, url)
        for e in entries:
            if e.method == "POST" and e.full_url in ids:
                made = e.same_as or e
                found = made.found.version if made.found is not None else None
                self._versions[e.full_url] = str(found.version_id) if found is not None else "1"

    def named_from(self, full_url: str | None) -> Callable[[str], str | None] | None:
        """The ``Type/id`` (or ``Type/id/_history/v``) on this server of the entry a reference
        in the entry at ``full_url`` names when it is not a fullUrl, else None; None when no
        such reference can name one (no RESTful fullUrl in the Bundle)."""
        if self._bases is None:
            return None
        if full_url is not None and (own := _restful(full_url)) is not None \
                and local_path(full_url, self._local_bases) is None:
            relative = self._bases.get(own[0], {})  # another server's base
        else:
            relative = self._bases[None]

        def named(ref: str) -> str | None:
            unversioned, history, version = ref.partition(_HISTORY)
            url = unversioned if "://" in unversioned else relative.get(unversioned)
            target = self.ids.get(url) if url is not None else None
            if target is None or not history:
                return target
            return f"{target}{_HISTORY}{self._versions.get(url, version)}"
        return named

    def rewrite(self, resource: dict[str, Any], full_url: str | None) -> int:
        """``_rewrite_references`` of the resource of the entry at ``full_url``, with the
        references that name an entry in other words than its fullUrl (a Bundle with RESTful
        fullUrls only; a Bundle of ``urn:uuid:`` fullUrls has none)."""
        return _rewrite_references(resource, self.ids, self.named_from(full_url))

    def target(self, ref: Any, full_url: str | None) -> str | None:
        """The ``Type/id`` on this server of the entry ``ref``, in the entry at ``full_url``,
        names, else None."""
        if not isinstance(ref, str):
            return None
        if (found := self.ids.get(ref)) is not None:
            return found
        named = self.named_from(full_url)
        return named(ref) if named is not None else None


def _restful(url: str | None) -> tuple[str, str] | None:
    """A RESTful fullUrl as (its base, its ``Type/id``); None for a ``urn:``, or none."""
    if url is None or url.startswith("urn:") or (tail := _RESTFUL_TAIL.search(url)) is None:
        return None
    return url[:tail.start()], url[tail.start() + 1:]


def _conditional_target(ref: Any, path: str) -> str | None:
    """The type a conditional reference (``Patient?identifier=…``) searches, None for any
    other reference; 422 for a type not stored here."""
    if not isinstance(ref, str) or "?" not in ref or ref.startswith(("http", "urn:")):
        return None
    rtype = ref.partition("?")[0]
    if rtype not in SUPPORTED_TYPES:
        raise rejected(422, "not-supported", f"conditional reference {ref!r}: type not "
                       "supported", f"{path}.reference")
    return rtype


def _conditionals(value: Any, path: str) -> Iterator[tuple[dict[str, Any], str, str]]:
    """(the Reference, its path, the type it searches) of each conditional reference in
    ``value``, in document order; a caller may rewrite each one's ``reference`` as it goes."""
    if isinstance(value, dict):
        if (rtype := _conditional_target(value.get("reference"), path)) is not None:
            yield value, path, rtype
        for key, item in value.items():
            yield from _conditionals(item, f"{path}.{key}")
    elif isinstance(value, list):
        for n, item in enumerate(value):
            yield from _conditionals(item, f"{path}[{n}]")


# Distinct conditional references (``Patient?identifier=…``) one Bundle may ask to resolve:
# each is a search, run while the Bundle's transaction holds its locks.
MAX_CONDITIONAL_REFERENCES = 1_000


class _Lookup:
    """What a Bundle's conditional references (``Patient?identifier=…``) resolve against:
    ``claimed``, the resources its own conditional creates and updates settled ((type, criteria
    key) → id: the stored match each found, or the resource it creates); ``deleted``, the ids
    its DELETE entries delete (they match nothing); and ``found``, what each reference resolved
    to so far (the same reference is resolved once: 20,000 searches took 20 s). ``searches``
    counts the references searched for in stored data (``MAX_CONDITIONAL_REFERENCES``)."""

    __slots__ = ("claimed", "deleted", "found", "searches")

    def __init__(self, claimed: dict[tuple[str, str], str] | None = None,
                 deleted: dict[str, set[str]] | None = None) -> None:
        self.claimed = claimed or {}
        self.deleted = deleted or {}
        self.found: dict[str, list[str]] = {}
        self.searches = 0


async def _conditional_references(repo: SqlResourceRepository, caller: Caller, entry: Entry,
                                  lookup: _Lookup | None = None) -> None:
    """``Patient?identifier=…`` references resolve to the one resource they match, or the
    entry fails (412). Criteria that a conditional create or update of the same transaction
    has (the same after ``normalise_criteria``, as its claim keys them) name that entry's
    resource, without a search: the stored resource it found, or the one it creates (which no
    search could find before it is written). Any other reference is searched for in what was
    stored before the transaction, less what its DELETE entries delete. More than
    ``MAX_CONDITIONAL_REFERENCES`` distinct searches are a 422."""
    lookup = _Lookup() if lookup is None else lookup
    for value, path, rtype in _conditionals(entry.resource, f"{_where(entry.index)}.resource"):
        ref = value["reference"]
        ids = lookup.found.get(ref)
        if ids is None:
            with handlers.placed(f"{path}.reference"):  # criteria the search refuses: 400, there
                params = handlers.normalise_criteria(rtype, ref, caller.local_bases)
                claimed = lookup.claimed.get((rtype, handlers.criteria_key(params)))
                if claimed is not None:
                    ids = [claimed]
                elif lookup.searches >= MAX_CONDITIONAL_REFERENCES:
                    raise rejected(422, "too-costly", "a Bundle may resolve at most "
                                   f"{MAX_CONDITIONAL_REFERENCES:,} different conditional "
                                   "references", f"{path}.reference")
                else:
                    lookup.searches += 1
                    ids = [m.id for m in await handlers.find(
                        repo, rtype, params, ignore=lookup.deleted.get(rtype, ()),
                        local_bases=caller.local_bases)]
            lookup.found[ref] = ids
        if len(ids) != 1:
            raise rejected(412, "not-found" if not ids else "multiple-matches",
                           f"conditional reference {ref!r} matches {len(ids)} "
                           "resources; exactly one is required", f"{path}.reference")
        value["reference"] = f"{rtype}/{ids[0]}"


async def _conditional_update(uow: UnitOfWork, caller: Caller, e: Entry,
                              ignore: Collection[str] = ()) -> None:
    """``PUT Type?criteria`` in a transaction: its id settled (``conditional_target``, as the
    REST ``PUT /fhir/Type?criteria`` settles it) before references are rewritten; ``ignore``:
    ids of the type that match nothing (the transaction deletes them)."""
    e.rid, e.creates = await handlers.conditional_target(
        uow, caller, e.rtype, e.criteria or "", e.resource or {},
        criteria_at=f"{_where(e.index)}.request.url", ignore=ignore,
        id_at=f"{_where(e.index)}.resource.id")
    e.resource = {**(e.resource or {}), "id": e.rid}


async def _resolve_ids(uow: UnitOfWork, caller: Caller,
                       entries: list[Entry]) -> tuple[_FullUrls, _Lookup]:
    """fullUrl → ``Type/id`` on this server, for every entry that creates or updates (with what
    else names them: ``_FullUrls``); and what the Bundle's conditional references resolve
    against (``_Lookup``: the ids each type's DELETE entries delete, and the id each
    conditional create's or update's criteria settled).

    A conditional create's or update's id is the resource its criteria find, so it is settled
    here, before any reference to its fullUrl is rewritten: its criteria are claimed now (held
    until the transaction ends), or an existing resource answers them, or an earlier entry of
    this Bundle with the same criteria owns them (a conditional create then answers with that
    entry's resource; any other pair touches one resource twice, which fails the transaction).
    A resource this Bundle deletes answers nothing (FHIR processes DELETEs first). Claims are
    taken in criteria order, so two transactions claiming the same criteria cannot
    deadlock."""
    repo = SqlResourceRepository(uow.session, caller.tenant)
    ids: dict[str, str] = {}
    deleted = await _deleted_by(repo, caller, entries)
    claimed: dict[tuple[str, str], Entry] = {}
    for e in entries:
        if e.method == "POST":
            e.rid = random_uuid()
    conditional = [(e, e.if_none_exist, "request.ifNoneExist") for e in entries
                   if e.method == "POST" and e.if_none_exist]
    conditional += [(e, e.criteria, "request.url") for e in entries
                    if e.method == "PUT" and e.rid is None and e.criteria]
    criteria: dict[str, list[tuple[str, str]]] = {}  # key → the normalised criteria
    keyed: list[tuple[str, Entry]] = []
    if conditional:
        for e, sent, element in conditional:
            with handlers.placed(f"{_where(e.index)}.{element}"):
                params = handlers.normalise_criteria(e.rtype, sent or "", caller.local_bases)
            criteria[key := handlers.criteria_key(params)] = params
            e.criteria_params = params
            keyed.append((key, e))
        for key, e in sorted(keyed, key=lambda k: (k[1].rtype, k[0], k[1].index)):
            await _claim(uow, caller, e, key, claimed, deleted.get(e.rtype, set()))
    for e in entries:
        if e.full_url and e.rid and e.method in ("POST", "PUT"):
            ids[e.full_url] = f"{e.rtype}/{e.rid}"
    names = _FullUrls(ids, entries, caller.local_bases)
    # A reference with an entry's criteria names the entry's resource when what the entry
    # sends meets them (one that creates must: ``_refuse_unmet``, once its references are
    # resolved); one that found a stored match is found by the search too, and so is the
    # match of one that updates it. (Two entries with one key have one id: a POST pair is one
    # resource, any other pair fails.)
    return names, _Lookup({(rtype, key): e.rid for (rtype, key), e in claimed.items()
                           if e.rid and handlers.meets_criteria(rtype, e.resource or {},
                                                                criteria[key],
                                                                _patient_of(e, names, caller))},
                          deleted)


def _refuse_unmet(caller: Caller, entries: list[Entry], names: _FullUrls | None = None) -> None:
    """An entry that creates must meet its own criteria (else each push of the Bundle creates
    one more: ``refuse_unmet``): the patient it names by a fullUrl is the id that entry settled
    (``names``), by a conditional reference the one it resolved to (without ``names``: the
    references are rewritten already)."""
    for e in entries:
        if e.creates and e.criteria_params is not None and e.resource is not None:
            handlers.refuse_unmet(
                e.rtype, {**e.resource, "id": e.rid}, e.criteria_params,
                _patient_of(e, names, caller),
                asked=("ifNoneExist " + repr(e.if_none_exist) if e.method == "POST"
                       else f"conditional update {e.rtype}?{e.criteria}"),
                at=f"{_where(e.index)}.request." + (
                    "ifNoneExist" if e.method == "POST" else "url"))


def _patient_by_criteria(e: Entry) -> bool:
    """Whether entry ``e``'s resource names its patient by a conditional reference."""
    element = handlers.PATIENT_ELEMENT.get(e.rtype)
    value = (e.resource or {}).get(element) if element else None
    ref = value.get("reference") if isinstance(value, dict) else None
    return isinstance(ref, str) and "?" in ref and not ref.startswith(("http", "urn:"))


def _patient_of(e: Entry, names: _FullUrls | None, caller: Caller) -> str | None:
    """The ``Patient/id`` entry ``e``'s resource is about (its patient element, a reference
    naming an entry of the Bundle read as the id that entry settled; without ``names``, as
    the resource says it), else None."""
    element = handlers.PATIENT_ELEMENT.get(e.rtype)
    value = (e.resource or {}).get(element) if element else None
    if not isinstance(value, dict):
        return None
    if names is not None and (local := names.target(value.get("reference"),
                                                    e.full_url)) is not None:
        value = {"reference": local}
    return reference(value, ("Patient",), caller.local_bases)


async def _deleted_by(repo: SqlResourceRepository, caller: Caller,
                     entries: list[Entry]) -> dict[str, set[str]]:
    """The ids each type's DELETE entries of this Bundle will delete."""
    deleted: dict[str, set[str]] = {}
    for e in entries:
        if e.method != "DELETE":
            continue
        if e.rid is not None:
            deleted.setdefault(e.rtype, set()).add(e.rid)
        elif e.criteria:
            try:
                matches = await handlers.find_by_criteria(repo, e.rtype, e.criteria,
                                                          local_bases=caller.local_bases)
            except FhirRejected:
                continue  # the entry itself fails with it when it runs
            deleted.setdefault(e.rtype, set()).update(m.id for m in matches)
    return deleted


async def _claim(uow: UnitOfWork, caller: Caller, e: Entry, key: str,
                 claimed: dict[tuple[str, str], Entry], deleted: set[str]) -> None:
    """Settle the id of conditional create or update ``e`` (see ``_resolve_ids``)."""
    if (first := claimed.get((e.rtype, key))) is not None:
        e.rid = first.rid
        if e.method == "POST" and first.method == "POST":
            e.same_as = first
        # (any other pair touches one resource twice: _one_entry_per_resource refuses it)
        return
    if e.method == "PUT":  # (its issues placed at the entry's request.url or resource.id)
        await _conditional_update(uow, caller, e, deleted)
    else:
        # What the search refuses in its criteria, or several matches: at the criteria.
        with handlers.placed(f"{_where(e.index)}.request.ifNoneExist"):
            e.found = await handlers.claim_create(uow, caller, e.rtype, e.rid or "",
                                                  e.if_none_exist or "", ignore=deleted)
        if e.found is not None:
            e.rid = e.found.id
        e.creates = e.found is None
    claimed[(e.rtype, key)] = e


def _put_without_target(e: Entry) -> FhirRejected:
    return rejected(422, "required", "PUT needs Type/id or Type?criteria",
                    f"{_where(e.index)}.request.url")


async def _run_entry(uow: UnitOfWork, caller: Caller, e: Entry) -> Outcome:
    repo = SqlResourceRepository(uow.session, caller.tenant)
    if e.method == "POST":
        outcome = await handlers.create(uow, caller, e.resource, if_none_exist=e.if_none_exist,
                                        new_id=e.rid, where=f"{_where(e.index)}.resource",
                                        criteria_at=f"{_where(e.index)}.request.ifNoneExist")
        return outcome
    if e.method == "PUT":
        if e.rid is None and e.criteria:  # in a batch (a transaction settled it already)
            return await handlers.conditional_update(
                uow, caller, e.rtype, e.criteria, e.resource,
                criteria_at=f"{_where(e.index)}.request.url", if_match=e.if_match,
                where=f"{_where(e.index)}.resource")
        if e.rid is None:
            raise _put_without_target(e)
        # Its body names the resource of its URL, as over REST (400 otherwise; FHIR: the
        # resource SHALL have an id equal to the URL's); a conditional update's was set above.
        return await handlers.update(uow, caller, e.rtype, e.rid, e.resource,
                                     if_match=e.if_match, where=f"{_where(e.index)}.resource")
    if e.method == "DELETE":
        if e.rid is not None:
            return await handlers.remove(uow, caller, e.rtype, e.rid, if_match=e.if_match)
        return await handlers.conditional_remove(uow, caller, e.rtype, e.criteria or "",
                                                 criteria_at=f"{_where(e.index)}.request.url",
                                                 if_match=e.if_match)
    # GET: reads never fail the Bundle; their status is the entry's.
    if e.refused is not None:  # a read of something not served here
        return Outcome(e.refused.status, e.rtype, "", None, e.refused.issues)
    try:
        if e.history is not None and not e.history:
            return await _history(repo, e)
        if e.rid is not None:  # a read or a vread: conditional when asked (ifNoneMatch, …)
            conditions = handlers.entry_read_conditions(e.if_none_match, e.if_modified_since,
                                                        _where(e.index))
            if e.history:
                version = await handlers.version_or_error(repo, e.rtype, e.rid, e.history,
                                                          f"{_where(e.index)}.request.url")
            else:
                version = handlers.current_or_error(await repo.current_version(e.rtype, e.rid),
                                                    e.rtype, e.rid)
            return handlers.read_outcome(e.rtype, e.rid, version, conditions)
        # Criteria and paging (_count, _offset), checked as a REST search's are.
        params = sorted(parse_qsl(e.query, keep_blank_values=True))
        with handlers.placed(f"{_where(e.index)}.request.url"):
            total, rows = await handlers.search(repo, e.rtype, params,
                                                local_bases=caller.local_bases)
        return Outcome(200, e.rtype, "", None, found=(total, rows, params))
    except FhirRejected as exc:
        return Outcome(exc.status, e.rtype, e.rid or "", None, exc.issues)


async def _history(repo: SqlResourceRepository, e: Entry) -> Outcome:
    """``GET Type/id/_history``: a page of its versions, as the REST history answers it (400
    for parameters it refuses, 404 for a resource never stored here)."""
    params = parse_qsl(e.query, keep_blank_values=True)
    where = f"{_where(e.index)}.request.url"
    with handlers.placed(where):
        total, versions, before_deleted = await handlers.history_or_error(
            repo, e.rtype, e.rid or "", params, where)
    return Outcome(200, e.rtype, e.rid or "", history=(total, versions, before_deleted, params))


async def transaction(uow: UnitOfWork, caller: Caller,
                      entries: list[Entry]) -> list[tuple[Entry, Outcome]]:
    """All entries in this unit of work, in FHIR's order (DELETE, POST, PUT, GET); any failure
    raises and the caller's unit of work rolls everything back.

    Every id is settled first (``_resolve_ids``: conditional creates and updates claim their
    criteria), then references are rewritten, before anything is written: fullUrls to their
    entries' ids, conditional references to the resource of a conditional create or update
    of this Bundle with the same criteria, else to the one stored resource they match.

    Consecutive creates and updates are stored together (``store_many``: a few statements for
    all of them); an entry that must look at the database first (a conditional create, an
    ``ifMatch``, a delete, a read) first flushes what is pending, so it sees every earlier entry.

    The rows its DELETE entries name by id are locked first, all at once in (type, id) order:
    each delete locks its row as it runs, in Bundle order, so concurrent transactions deleting
    the same resources in other orders deadlocked; now they queue.
    """
    caller = await handlers.current_caller(uow, caller)  # before any row is locked
    repo = SqlResourceRepository(uow.session, caller.tenant)
    await repo.lock_rows([(e.rtype, e.rid) for e in entries
                          if e.method == "DELETE" and e.rid is not None])
    names, lookup = await _resolve_ids(uow, caller, entries)
    _one_entry_per_resource(entries)
    # What creates must meet its criteria: judged now unless it names its patient by a
    # conditional reference, which is judged once that is resolved (below). (First, so an
    # entry's own criteria are blamed before a reference to them that then finds nothing.)
    judged_now: list[Entry] = []
    judged_later: list[Entry] = []
    for e in entries:
        (judged_later if _patient_by_criteria(e) else judged_now).append(e)
    _refuse_unmet(caller, judged_now, names)
    unresolved: list[Issue] = []
    for e in entries:
        if e.resource is not None:
            # The parsed request body is ours: rewritten in place, no copy.
            left = names.rewrite(e.resource, e.full_url)
            # (one in a contained resource is flagged but not refused: stored as sent)
            issues = _unresolved(e) if left & UNRESOLVED else []
            unresolved += issues
            # A patient link given as a urn: is checked now that it names its type.
            unresolved += [i.located(f"{_where(e.index)}.resource")
                           for i in subject_targets(e.resource, e.rtype)]
            if left & CONDITIONAL and not issues:
                await _conditional_references(repo, caller, e, lookup)
    if unresolved:
        raise FhirRejected(422, unresolved)
    _refuse_unmet(caller, judged_later)
    results: dict[int, Outcome] = {}
    pending: list[tuple[Entry, handlers.Write]] = []

    async def flush() -> None:
        outcomes = await handlers.store_many(uow, caller, [w for _, w in pending])
        results.update((e.index, o) for (e, _), o in zip(pending, outcomes, strict=True))
        pending.clear()

    for e in sorted(entries, key=lambda x: METHOD_ORDER[x.method]):
        with _at_entry(e.index):
            write = _plain_write(e)
            if write is not None:
                pending.append((e, write))
                continue
            if e.method == "POST" and e.if_none_exist:  # its id was settled by _resolve_ids
                if e.found is not None:  # (its references rewritten: comparable now)
                    results[e.index] = handlers.kept_as_it_is(e.found, e.resource,
                                                              e.if_none_exist)
                elif e.same_as is not None:  # answers with what that entry stored
                    await flush()
                    first = results[e.same_as.index]
                    results[e.index] = Outcome(200, first.resource_type, first.id, first.version,
                                               patient=first.patient)
                else:
                    pending.append((e, handlers.Write(e.rtype, e.rid, e.resource, fresh=True,
                                                      where=f"{_where(e.index)}.resource")))
                continue
            await flush()
            results[e.index] = await _run_entry(uow, caller, e)
    await flush()
    return [(e, results[e.index]) for e in entries]


def check_bundle(caller: Caller, kind: str, entries: list[Entry]) -> list[Issue]:
    """``$validate`` of a parsed transaction or batch Bundle: what processing it would refuse
    without reading stored data (FhirRejected: a request's error at once, as the write answers
    it, else every resource's problem together, 422), and the warnings the write would give.
    A transaction's ``urn:`` references must name its entries, and each written resource, its
    references resolved, must pass the rules a create applies (``check_as_create``). Not
    checked: what conditional creates, updates and references match (stored data)."""
    ids: dict[str, str] = {}
    if kind == "transaction":
        for e in entries:
            if e.full_url and e.method in ("POST", "PUT"):
                ids[e.full_url] = f"{e.rtype}/{e.rid or f'validate-{e.index}'}"
        _one_entry_per_resource(entries)
    names = _FullUrls(ids, entries, caller.local_bases)
    for e in entries:  # the request's own parts, refused as the write refuses them
        with _at_entry(e.index):
            if e.if_match is not None and e.method in ("PUT", "DELETE"):
                handlers.parse_etag(e.if_match)  # the only entries whose ifMatch is read
            if e.method == "POST" and e.if_none_exist:
                with handlers.placed(f"{_where(e.index)}.request.ifNoneExist"):
                    handlers.check_criteria(e.rtype, e.if_none_exist)
            if e.method in ("PUT", "DELETE") and e.rid is None:
                if e.method == "PUT" and not e.criteria:
                    raise _put_without_target(e)
                with handlers.placed(f"{_where(e.index)}.request.url"):
                    handlers.check_criteria(e.rtype, e.criteria or "")
            if e.method == "PUT" and e.rid is not None:
                handlers.check_update_id(e.rtype, e.rid, e.resource)
    issues: list[Issue] = []
    warnings: list[Issue] = []
    for e in entries:
        if e.resource is None:
            continue
        resource = copy.deepcopy(e.resource)  # as a transaction would rewrite it
        left = names.rewrite(resource, e.full_url)
        where = f"{_where(e.index)}.resource"
        if left & UNRESOLVED and (found := unresolved_local_references(resource, e.rtype)):
            issues += [i.located(where) for i in found]
            continue
        issues += [i.located(where) for i in subject_targets(resource, e.rtype)]
        if left & CONDITIONAL:
            try:
                _stand_in_for_conditionals(resource, where)
            except FhirRejected as exc:
                if exc.status != 422:
                    raise  # criteria the search refuses: 400, as the write answers
                issues += exc.issues
                continue
        try:  # located as the transaction locates them (``Write.where``)
            warnings += [i.located(where) for i in handlers.check_as_create(
                caller, e.rtype, {**resource, "id": e.rid} if e.rid else resource)]
        except FhirRejected as exc:
            issues += [i.located(where) for i in exc.issues]
    if issues:
        raise FhirRejected(422, issues)
    return warnings


def _stand_in_for_conditionals(value: Any, path: str) -> None:
    """``Type?criteria`` references replaced, in place, by a reference to some ``Type``
    resource of this server (what they resolve to when one resource matches)."""
    for found, at, rtype in _conditionals(value, path):
        with handlers.placed(f"{at}.reference"):  # what the search refuses: 400
            handlers.check_criteria(rtype, found["reference"])
        found["reference"] = f"{rtype}/validate-conditional"


def _one_entry_per_resource(entries: list[Entry]) -> None:
    """A transaction touches each resource once (FHIR: overlapping identities fail it)."""
    seen: dict[tuple[str, str], int] = {}
    issues = []
    for e in entries:
        if e.method not in ("POST", "PUT", "DELETE") or e.rid is None or e.same_as is not None:
            continue
        first = seen.setdefault((e.rtype, e.rid), e.index)
        if first != e.index:
            issues.append(Issue("error", "invariant", f"{e.rtype}/{e.rid} is also written by "
                                f"Bundle.entry[{first}]: a transaction may touch a resource "
                                "only once", (f"{_where(e.index)}.request.url",)))
    if issues:
        raise FhirRejected(422, issues)


# What the REST interactions' issues name, as a Bundle entry has it.
_ENTRY_FIELDS = {"If-None-Exist": "request.ifNoneExist", "If-Match": "request.ifMatch"}


def _in_entry(expression: str) -> str:
    """An expression of a request (its headers) or of its resource (``Patient.id``) as the
    Bundle entry's element (``request.ifMatch``, ``resource.id``: FHIRPath, no type)."""
    if expression in _ENTRY_FIELDS:
        return _ENTRY_FIELDS[expression]
    head, _, rest = expression.partition(".")
    return f"resource.{rest}" if head in SUPPORTED_TYPES and rest else expression


class _at_entry(Relocating):  # noqa: N801 - a context manager, named as one
    """FhirRejected raised inside, with its issues located under ``Bundle.entry[index]``."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def relocate(self, issues: list[Issue]) -> list[Issue]:
        return _located(issues, self.index)




def _located(issues: list[Issue], index: int) -> list[Issue]:
    """Issues under their Bundle entry (those already there stay as they are)."""
    located = []
    for issue in issues:
        if issue.expression and issue.expression[0].startswith("Bundle"):
            located.append(issue)
            continue
        issue = Issue(issue.severity, issue.code, issue.diagnostics,
                      tuple(_in_entry(x) for x in issue.expression))
        located.append(issue.located(_where(index)))
    return located


def _failed(e: Entry, exc: Exception) -> Outcome:
    """A batch entry's answer to an error of ours: the other entries are committed, so the
    Bundle still says what happened to this one. A deadlock rolled it back whole: 503, to be
    sent again."""
    if gave_way(exc):
        return Outcome(503, e.rtype, e.rid or "", None, [Issue(
            "error", "transient", "the database rolled this entry back so that a concurrent "
            "transaction could go on; nothing of it was stored: send it again",
            (_where(e.index),))])
    log.exception("batch entry failed", entry=e.index, error=type(exc).__name__)
    return Outcome(500, e.rtype, e.rid or "", None, [Issue(
        "error", "exception", "this entry failed on the server"
        + ("" if e.method == "GET" else "; nothing of it was stored"), (_where(e.index),))])


def _unresolved(e: Entry) -> list[Issue]:
    return [issue.located(f"{_where(e.index)}.resource")
            for issue in unresolved_local_references(e.resource, e.rtype)]


def _plain_write(e: Entry) -> handlers.Write | None:
    """The entry as a write that needs no database look first (a plain create, an update
    without ``ifMatch``), else None."""
    if e.method == "POST" and not e.if_none_exist:
        return handlers.Write(e.rtype, e.rid, e.resource, fresh=True,
                              where=f"{_where(e.index)}.resource")
    if e.method != "PUT" or e.if_match or e.rid is None:
        return None
    if e.resource.get("id") != e.rid:
        return None  # _run_entry → update() answers the missing or other id
    return handlers.Write(e.rtype, e.rid, e.resource, where=f"{_where(e.index)}.resource")


async def batch(open_uow: Callable[[], Any], caller: Caller, entries: list[Entry],
                commit: Callable[[UnitOfWork], Awaitable[None]]) -> list[tuple[Entry, Outcome]]:
    """Each entry in a unit of work of its own; a failing entry reports its own outcome."""
    results = []
    for e in entries:
        if e.refused is not None:
            results.append((e, Outcome(e.refused.status, e.rtype, "", None, e.refused.issues)))
            continue
        try:
            if e.resource is not None and (unresolved := _unresolved(e)):
                raise FhirRejected(422, unresolved)
            async with open_uow() as uow:
                # A write holds the config before it locks any row; a read needs no hold.
                held = (caller if e.method == "GET"
                        else await handlers.current_caller(uow, caller))
                if e.resource is not None:
                    await _conditional_references(
                        SqlResourceRepository(uow.session, held.tenant), held, e)
                if e.method == "POST":
                    e.rid = None
                outcome = await _run_entry(uow, held, e)
                await commit(uow)
        except FhirRejected as exc:
            outcome = Outcome(exc.status, e.rtype, e.rid or "", None,
                              _located(exc.issues, e.index))
        except Exception as exc:  # noqa: BLE001 - a fault of ours: this entry's answer only
            outcome = _failed(e, exc)
        results.append((e, outcome))
    return results
