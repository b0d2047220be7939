//! E2B's sandbox routes (`docs/e2b-compat-plan.md` §3–§5, §10).
//!
//! - A sandbox is any capsule of the caller's team; E2B shows only two
//!   states, so transitional ones map onto `running`/`paused` and
//!   stopped, failed or missing capsules do not exist (404).
//! - Unknown and malformed IDs are 404, never 400: the SDKs map only 404
//!   to "not found" (and `kill` to `False`).
//! - Sandboxes made here have an absolute deadline (`endAt`) that
//!   [`super::deadline`] enforces, and no inactivity TTL; capsules made by
//!   wrenn's API keep theirs until an E2B call sets a timeout.
//! - `templateID` and `alias` are the template's name.
//! - Logs are the capsule's log (`capsule_logs`): what happened to it, as
//!   the control plane saw it, not the output of processes in it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use wrenn_proto::wrenn::agent::v1 as pb;
use wrenn_types::envd::ENVD_PROTOCOL_VERSION;
use wrenn_types::ids::{CapsuleId, TeamId};

use super::{E2bCaller, E2bError, E2bJson, E2bResult};
use crate::api::capsules::{self, Launch, RESERVED_METADATA};
use crate::db::{now_ms, CapsuleRow, LogLine, MetricRow, OnTimeout};
use crate::events::Actor;
use crate::model::{rfc3339, rfc3339_millis, Status};
use crate::server::Cp;

/// `timeout` when a create or connect leaves it out (seconds).
pub const DEFAULT_TIMEOUT: i64 = 300;
/// The legacy `resume` route's default (E2B's generated client says 15).
const DEFAULT_RESUME_TIMEOUT: i64 = 15;
/// The longest timeout accepted: 30 days.
const MAX_TIMEOUT: i64 = 30 * 24 * 3600;
/// `endAt` of a capsule with no deadline at all.
const NEVER_MS: i64 = 253_402_300_799_000; // 9999-12-31T23:59:59Z
const MAX_METADATA_KEYS: usize = 100;
const MAX_LIST_LIMIT: usize = 100;
/// Creates remembered per `Idempotency-Key`.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(3600);
/// `clientID` is deprecated but still required by the SDKs' parsers.
const CLIENT_ID: &str = "wrenn";

/// E2B's state of a capsule, or None when E2B would not show it.
pub fn state(c: &CapsuleRow) -> Option<&'static str> {
    match c.status {
        Status::Pending
        | Status::Starting
        | Status::Running
        | Status::Resuming
        | Status::Snapshotting => Some("running"),
        Status::Pausing | Status::Paused | Status::Hibernated => Some("paused"),
        Status::Stopping | Status::Stopped | Status::Missing | Status::Error => None,
    }
}

/// The caller's sandbox `id`, or 404.
async fn find(cp: &Cp, caller: &E2bCaller, id: &str) -> E2bResult<CapsuleRow> {
    let Ok(cid) = id.parse::<CapsuleId>() else {
        return Err(E2bError::not_found(id));
    };
    match cp.db.capsule(caller.0.team_id(), &cid).await? {
        Some(c) if state(&c).is_some() => Ok(c),
        _ => Err(E2bError::not_found(id)),
    }
}

/// The domain sandbox hosts are built with (`{port}-{id}.{domain}`).
pub fn domain(cp: &Cp) -> String {
    match (&cp.config.proxy_domain, cp.listen_addr.get()) {
        (Some(d), _) => d.clone(),
        (None, Some(a)) => format!("localhost:{}", a.port()),
        (None, None) => "localhost".into(),
    }
}

/// When the capsule's time runs out (Unix ms).
fn end_at(c: &CapsuleRow) -> i64 {
    match c.end_at {
        Some(e) => e,
        None if c.timeout_sec > 0 => {
            let active = c.last_active_at.or(c.started_at).unwrap_or(c.created_at);
            active + c.timeout_sec * 1000
        }
        None => NEVER_MS,
    }
}

fn user_metadata(c: &CapsuleRow) -> BTreeMap<String, String> {
    c.metadata
        .iter()
        .filter(|(k, _)| !RESERVED_METADATA.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `Sandbox`: what create, connect and resume answer.
fn sandbox_json(cp: &Cp, c: &CapsuleRow) -> Value {
    json!({
        "templateID": c.template,
        "sandboxID": c.id.to_string(),
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_PROTOCOL_VERSION,
        "alias": c.template,
        "envdAccessToken": (!c.access_token.is_empty()).then_some(&c.access_token),
        "trafficAccessToken": Value::Null,
        "domain": domain(cp),
    })
}

/// `ListedSandbox`.
fn listed_json(c: &CapsuleRow) -> Value {
    json!({
        "templateID": c.template,
        "alias": c.template,
        "sandboxID": c.id.to_string(),
        "clientID": CLIENT_ID,
        "startedAt": rfc3339(c.started_at.unwrap_or(c.created_at)),
        "endAt": rfc3339(end_at(c)),
        "cpuCount": c.vcpus,
        "memoryMB": c.memory_mb,
        "diskSizeMB": c.disk_size_mb,
        "state": state(c).unwrap_or("running"),
        "envdVersion": ENVD_PROTOCOL_VERSION,
        "metadata": user_metadata(c),
    })
}

/// `SandboxDetail`.
fn detail_json(cp: &Cp, c: &CapsuleRow) -> Value {
    let mut v = listed_json(c);
    let on_timeout = match (c.end_at, c.on_timeout) {
        // wrenn's own TTL pauses
        (None, _) | (Some(_), OnTimeout::Pause) => "pause",
        (Some(_), OnTimeout::Kill) => "kill",
    };
    let o = v.as_object_mut().expect("an object");
    o.insert("domain".into(), json!(domain(cp)));
    if !c.access_token.is_empty() {
        o.insert("envdAccessToken".into(), json!(c.access_token));
    }
    // (E2B's: only when the creator set it)
    if let Some(allowed) = c.allow_internet {
        o.insert("allowInternetAccess".into(), json!(allowed));
    }
    o.insert(
        "lifecycle".into(),
        json!({"autoResume": false, "onTimeout": on_timeout}),
    );
    v
}

// ---- create -----------------------------------------------------------

/// `NewSandbox` (v2; v1 adds `secure`, ignored: every sandbox is secured).
#[derive(Debug, Deserialize)]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<i64>,
    #[serde(rename = "autoPause")]
    auto_pause: Option<bool>,
    #[serde(rename = "autoPauseMemory")]
    auto_pause_memory: Option<bool>,
    allow_internet_access: Option<bool>,
    metadata: Option<BTreeMap<String, String>>,
    #[serde(rename = "envVars")]
    env_vars: Option<BTreeMap<String, String>>,
    mcp: Option<Value>,
    #[serde(rename = "volumeMounts")]
    volume_mounts: Option<Value>,
    network: Option<Value>,
    #[serde(rename = "autoResume")]
    auto_resume: Option<Value>,
}

/// A `network` setting other than the defaults: refused, as a sandbox's
/// egress here is all or nothing (`allow_internet_access`) and its ports
/// are public to whoever has its ID; accepting and ignoring it would leave
/// a sandbox open that its creator asked to close.
fn unsupported_network(network: &Value) -> Option<&str> {
    let fields = match network {
        Value::Null => return None,
        Value::Object(fields) => fields,
        _ => return Some("(not an object)"),
    };
    fields.iter().find_map(|(k, v)| {
        let default = match v {
            Value::Null => true,
            // (an empty list of DNS servers is a setting: none)
            Value::Array(a) => a.is_empty() && k != "dnsServers",
            Value::Object(o) => o.is_empty(),
            Value::Bool(true) => k == "allowPublicTraffic",
            _ => false,
        };
        (!default).then_some(k.as_str())
    })
}

fn timeout_of(t: Option<i64>, default: i64) -> E2bResult<i64> {
    match t.unwrap_or(default) {
        t if t < 0 => Err(E2bError::bad_request("timeout must not be negative")),
        t if t > MAX_TIMEOUT => Err(E2bError::bad_request(format!(
            "timeout must be at most {MAX_TIMEOUT} seconds"
        ))),
        t => Ok(t),
    }
}

fn validate(body: &NewSandbox) -> E2bResult<()> {
    if body.mcp.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(E2bError::bad_request("mcp is not supported"));
    }
    if body
        .volume_mounts
        .as_ref()
        .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(E2bError::bad_request("volume mounts are not supported"));
    }
    if let Some(field) = body.network.as_ref().and_then(unsupported_network) {
        return Err(E2bError::bad_request(format!(
            "network.{field} is not supported: a sandbox's egress is all or nothing \
             (allow_internet_access), and its ports are reached by its ID"
        )));
    }
    if body
        .auto_resume
        .as_ref()
        .is_some_and(|a| a["enabled"] == Value::Bool(true))
    {
        return Err(E2bError::bad_request(
            "auto-resume on traffic is not supported: resume a paused sandbox with connect()",
        ));
    }
    if body.auto_pause_memory == Some(false) {
        return Err(E2bError::bad_request(
            "filesystem-only pauses are not supported (a pause keeps memory)",
        ));
    }
    let metadata = body.metadata.iter().flatten();
    if metadata.clone().count() > MAX_METADATA_KEYS {
        return Err(E2bError::bad_request(format!(
            "metadata has more than {MAX_METADATA_KEYS} keys"
        )));
    }
    if let Some((k, _)) = metadata
        .clone()
        .find(|(k, _)| k.is_empty() || k.len() > 256)
    {
        return Err(E2bError::bad_request(format!("invalid metadata key {k:?}")));
    }
    for k in body.env_vars.iter().flatten().map(|(k, _)| k) {
        if k.is_empty() || k.contains(['=', '\0']) {
            return Err(E2bError::bad_request(format!(
                "invalid environment variable name {k:?}"
            )));
        }
    }
    Ok(())
}

async fn create_sandbox(cp: &Cp, caller: &E2bCaller, body: NewSandbox) -> E2bResult<CapsuleRow> {
    validate(&body)?;
    let Some(name) = body.template_id.clone().filter(|t| !t.is_empty()) else {
        return Err(E2bError::bad_request("templateID is required"));
    };
    let timeout = timeout_of(body.timeout, DEFAULT_TIMEOUT)?;
    let template = cp
        .db
        .resolve_template(caller.0.team_id(), &name)
        .await?
        .ok_or_else(|| match cp.is_building(&name) {
            true => E2bError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("template '{name}' is still being built"),
            ),
            false => E2bError::new(
                StatusCode::NOT_FOUND,
                format!("template '{name}' not found"),
            ),
        })?;
    let mut spec = Launch::new(&template);
    spec.metadata = body.metadata.unwrap_or_default();
    spec.metadata_to_envd = false;
    spec.env = body.env_vars.unwrap_or_default();
    spec.internet = body.allow_internet_access;
    spec.end_at = Some(now_ms() + timeout * 1000);
    spec.on_timeout = if body.auto_pause.unwrap_or(false) {
        OnTimeout::Pause
    } else {
        OnTimeout::Kill
    };
    let team = caller.0.team_id().clone();
    Ok(capsules::launch(cp, &team, Actor::key(&caller.0), spec).await?)
}

/// Remembered creates by `Idempotency-Key`: a retry gets the sandbox the
/// first request made (or is still making).
#[derive(Debug, Default)]
pub struct Idempotency {
    map: Mutex<HashMap<(TeamId, String), Remembered>>,
}

/// The sandbox one `Idempotency-Key` made (set once its create
/// succeeded), and when the key was first seen.
type Remembered = (Instant, Arc<CreateOnce>);
type CreateOnce = tokio::sync::OnceCell<CapsuleId>;

impl Idempotency {
    fn cell(&self, team: &TeamId, key: &str) -> Arc<CreateOnce> {
        let mut map = self.map.lock().unwrap();
        map.retain(|_, (at, _)| at.elapsed() < IDEMPOTENCY_TTL);
        map.entry((team.clone(), key.to_owned()))
            .or_insert_with(|| (Instant::now(), Arc::default()))
            .1
            .clone()
    }

    /// Forget a key whose create (with `cell`) failed, unless another
    /// request with the key is still at it or one has succeeded: refused
    /// requests are not kept for an hour.
    fn forget_failed(&self, team: &TeamId, key: &str, cell: &Arc<CreateOnce>) {
        let mut map = self.map.lock().unwrap();
        let k = (team.clone(), key.to_owned());
        // (held by the map and by the caller only: nobody else waits on it)
        let alone = |(_, c): &Remembered| {
            Arc::ptr_eq(c, cell) && !c.initialized() && Arc::strong_count(c) == 2
        };
        if map.get(&k).is_some_and(alone) {
            map.remove(&k);
        }
    }
}

/// `POST /v2/sandboxes` and `POST /sandboxes` (v1's body adds `secure`,
/// ignored: every sandbox is secured).
pub async fn create(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    headers: HeaderMap,
    E2bJson(body): E2bJson<NewSandbox>,
) -> E2bResult<(StatusCode, Json<Value>)> {
    let (cp, caller) = (&*cp, &caller);
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap_or_default());
    let c = match key {
        None => create_sandbox(cp, caller, body).await?,
        Some(k) if k.is_empty() || k.len() > 255 => {
            return Err(E2bError::bad_request(
                "Idempotency-Key must be 1 to 255 visible characters",
            ))
        }
        Some(k) => {
            let cell = cp.e2b.idempotency.cell(caller.0.team_id(), k);
            let made = cell
                .get_or_try_init(|| async { create_sandbox(cp, caller, body).await.map(|c| c.id) })
                .await;
            let id = match made {
                Ok(id) => id,
                Err(e) => {
                    cp.e2b
                        .idempotency
                        .forget_failed(caller.0.team_id(), k, &cell);
                    return Err(e);
                }
            };
            cp.db
                .capsule(caller.0.team_id(), id)
                .await?
                .ok_or_else(|| E2bError::not_found(id.as_str()))?
        }
    };
    Ok((StatusCode::CREATED, Json(sandbox_json(cp, &c))))
}

// ---- list -------------------------------------------------------------

/// The `metadata` filter: `k=v&…` whose keys and values are
/// percent-encoded once more (`docs/e2b-compat-plan.md` §4.4).
pub fn parse_metadata_filter(q: &str) -> BTreeMap<String, String> {
    let once = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (once(&k), once(&v)))
        .collect()
}

#[derive(Debug, Default)]
struct Filter {
    metadata: BTreeMap<String, String>,
    states: Option<Vec<String>>,
    template: Option<String>,
    started_after: Option<i64>,
}

impl Filter {
    fn from_query(q: &HashMap<String, String>) -> E2bResult<Filter> {
        let started_after = match q.get("startedAfter").filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => {
                let t =
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .map_err(|_| {
                            E2bError::bad_request("startedAfter must be an RFC 3339 time")
                        })?;
                Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
            }
        };
        let states = match q.get("state").filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => {
                let states: Vec<String> = s.split(',').map(|x| x.trim().to_owned()).collect();
                if let Some(bad) = states
                    .iter()
                    .find(|s| !matches!(s.as_str(), "running" | "paused"))
                {
                    return Err(E2bError::bad_request(format!(
                        "invalid state {bad:?}: running or paused"
                    )));
                }
                Some(states)
            }
        };
        Ok(Filter {
            metadata: q
                .get("metadata")
                .map(|m| parse_metadata_filter(m))
                .unwrap_or_default(),
            states,
            template: q.get("template").filter(|t| !t.is_empty()).cloned(),
            started_after,
        })
    }

    fn matches(&self, c: &CapsuleRow) -> bool {
        let Some(st) = state(c) else { return false };
        self.states
            .as_ref()
            .is_none_or(|s| s.iter().any(|x| x == st))
            && self
                .metadata
                .iter()
                .all(|(k, v)| c.metadata.get(k) == Some(v))
            && self.template.as_ref().is_none_or(|t| *t == c.template)
            && self
                .started_after
                .is_none_or(|t| c.started_at.unwrap_or(c.created_at) > t)
    }
}

/// The page cursor: the last item's (created_at, id).
fn cursor(c: &CapsuleRow) -> String {
    format!("{}.{}", c.created_at, c.id)
}

fn parse_cursor(s: &str) -> E2bResult<(i64, String)> {
    s.split_once('.')
        .and_then(|(t, id)| Some((t.parse().ok()?, id.to_owned())))
        .ok_or_else(|| E2bError::bad_request("invalid nextToken"))
}

/// `GET /v2/sandboxes`: newest first (or `order=asc`), paged with
/// `X-Next-Token` (absent on the last page).
pub async fn list(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Query(q): Query<HashMap<String, String>>,
) -> E2bResult<Response> {
    let filter = Filter::from_query(&q)?;
    let asc = match q.get("order").map(String::as_str) {
        None | Some("") | Some("desc") => false,
        Some("asc") => true,
        Some(o) => return Err(E2bError::bad_request(format!("invalid order {o:?}"))),
    };
    let limit = match q.get("limit").filter(|l| !l.is_empty()) {
        None => MAX_LIST_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_LIST_LIMIT).contains(l))
            .ok_or_else(|| E2bError::bad_request("limit must be 1 to 100"))?,
    };
    let after = q
        .get("nextToken")
        .filter(|t| !t.is_empty())
        .map(|t| parse_cursor(t))
        .transpose()?;
    let mut rows: Vec<CapsuleRow> = cp
        .db
        .capsules(caller.0.team_id())
        .await?
        .into_iter()
        .filter(|c| filter.matches(c))
        .collect();
    // capsules() is newest first: (created_at, id) descending
    if asc {
        rows.reverse();
    }
    let start = match &after {
        None => 0,
        Some((t, id)) => rows
            .iter()
            .position(|c| {
                let k = (c.created_at, c.id.as_str());
                if asc {
                    k > (*t, id.as_str())
                } else {
                    k < (*t, id.as_str())
                }
            })
            .unwrap_or(rows.len()),
    };
    let page: Vec<&CapsuleRow> = rows[start..].iter().take(limit).collect();
    let more = start + page.len() < rows.len();
    let items: Vec<Value> = page.iter().map(|c| listed_json(c)).collect();
    let mut resp = Json(items).into_response();
    if let (true, Some(last)) = (more, page.last()) {
        if let Ok(v) = HeaderValue::from_str(&cursor(last)) {
            resp.headers_mut().insert("x-next-token", v);
        }
    }
    Ok(resp)
}

/// `GET /sandboxes` (legacy): running sandboxes, metadata filter, no pages.
pub async fn list_v1(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Query(q): Query<HashMap<String, String>>,
) -> E2bResult<Json<Vec<Value>>> {
    let mut filter = Filter::from_query(&q)?;
    filter.states = Some(vec!["running".into()]);
    let rows = cp.db.capsules(caller.0.team_id()).await?;
    Ok(Json(
        rows.iter()
            .filter(|c| filter.matches(c))
            .map(listed_json)
            .collect(),
    ))
}

// ---- one sandbox --------------------------------------------------------

/// `GET /sandboxes/{id}`
pub async fn detail(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Path(id): Path<String>,
) -> E2bResult<Json<Value>> {
    let c = find(&cp, &caller, &id).await?;
    Ok(Json(detail_json(&cp, &c)))
}

/// `DELETE /sandboxes/{id}` — 204; 404 once gone.
pub async fn kill(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Path(id): Path<String>,
) -> E2bResult<StatusCode> {
    let c = find(&cp, &caller, &id).await?;
    // (of kills that race, one kills it; the others find it gone, as
    // E2B's: the SDK's `kill` is then false)
    if !capsules::destroy_capsule(&cp, &c, Actor::key(&caller.0)).await? {
        return Err(E2bError::not_found(&id));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub struct TimeoutBody {
    timeout: Option<i64>,
}

/// `POST /sandboxes/{id}/timeout` — `endAt = now + timeout` (may shorten).
pub async fn set_timeout(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Path(id): Path<String>,
    E2bJson(body): E2bJson<TimeoutBody>,
) -> E2bResult<StatusCode> {
    let c = find(&cp, &caller, &id).await?;
    let Some(t) = body.timeout else {
        return Err(E2bError::bad_request("timeout is required"));
    };
    let t = timeout_of(Some(t), 0)?;
    // A capsule made by wrenn's API has no deadline; what ended its time
    // was its inactivity TTL, which pauses (its lifecycle says `pause`).
    // The deadline takes the TTL's place and pauses too: never a kill of
    // a capsule that was shown as pausing.
    let on_timeout = match c.end_at {
        None => OnTimeout::Pause,
        Some(_) => c.on_timeout,
    };
    cp.db
        .set_deadline(&c.id, Some(now_ms() + t * 1000), on_timeout)
        .await?;
    cp.e2b.deadlines.notify_one();
    if c.timeout_sec > 0 {
        drop_ttl(&cp, &c).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Ends a running capsule's inactivity TTL (the agent's and the row's):
/// once E2B has set its timeout, it lives until then, busy or not. Best
/// effort: a TTL left in place (the capsule paused, its agent unreachable)
/// can only pause it before the deadline, never lose it.
async fn drop_ttl(cp: &Cp, c: &CapsuleRow) {
    if c.status != Status::Running {
        return;
    }
    let Ok(host) = crate::api::host_of(cp, c) else {
        return;
    };
    let ping = pb::PingRequest {
        id: c.id.to_string(),
        timeout_sec: Some(0),
        ..Default::default()
    };
    let dropped = match host.rpc.ping_capsule(ping).await {
        Ok(_) => cp.db.set_ttl(&c.id, 0).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = dropped {
        tracing::warn!(capsule = %c.id, error = %e, "the inactivity timeout stays");
    }
}

#[derive(Debug, Deserialize)]
pub struct RefreshBody {
    duration: Option<i64>,
}

/// `POST /sandboxes/{id}/refreshes` — `endAt = max(endAt, now + duration)`.
pub async fn refresh(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Path(id): Path<String>,
    E2bJson(body): E2bJson<RefreshBody>,
) -> E2bResult<StatusCode> {
    let c = find(&cp, &caller, &id).await?;
    let d = timeout_of(body.duration, 60)?;
    extend(&cp, &c, d).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A running capsule's deadline moves to `now + secs` if that is later
/// (one without a deadline keeps none: it was made by wrenn's API).
async fn extend(cp: &Cp, c: &CapsuleRow, secs: i64) -> E2bResult<()> {
    if let Some(end) = c.end_at {
        let wanted = now_ms() + secs * 1000;
        if wanted > end {
            cp.db
                .set_deadline(&c.id, Some(wanted), c.on_timeout)
                .await?;
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
pub struct PauseBody {
    memory: Option<bool>,
}

/// `POST /sandboxes/{id}/pause` — 204; 409 when already paused.
pub async fn pause(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Path(id): Path<String>,
    E2bJson(body): E2bJson<PauseBody>,
) -> E2bResult<StatusCode> {
    if body.memory == Some(false) {
        return Err(E2bError::bad_request(
            "filesystem-only pauses are not supported (a pause keeps memory)",
        ));
    }
    let c = find(&cp, &caller, &id).await?;
    if state(&c) == Some("paused") {
        return Err(E2bError::conflict(format!(
            "sandbox {id} is already paused"
        )));
    }
    let host = crate::api::host_of(&cp, &c)?;
    capsules::pause_capsule(&cp, &c, &host, Actor::key(&caller.0)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub struct ConnectBody {
    timeout: Option<i64>,
    memory: Option<bool>,
}

/// Resume a paused sandbox with a new deadline `now + timeout` (`c` as
/// read under its lifecycle lock, which the caller holds).
async fn resume_with(cp: &Cp, actor: Actor, c: &CapsuleRow, timeout: i64) -> E2bResult<CapsuleRow> {
    // The new deadline first: once running, a deadline that passed while
    // the sandbox was paused would end it at once.
    if c.end_at.is_some() {
        cp.db
            .set_deadline(&c.id, Some(now_ms() + timeout * 1000), c.on_timeout)
            .await?;
    }
    let resumed = capsules::resume_locked(cp, c, actor).await?;
    Ok(cp
        .db
        .capsule(&resumed.team_id, &resumed.id)
        .await?
        .unwrap_or(resumed))
}

/// Sandbox `id` as read again under its lifecycle lock ([`capsules::locked`]):
/// a concurrent connect, pause or kill has finished by then.
fn still_there(now: Option<CapsuleRow>, id: &str) -> E2bResult<CapsuleRow> {
    match now {
        Some(c) if state(&c).is_some() => Ok(c),
        _ => Err(E2bError::not_found(id)),
    }
}

/// `POST /v2/sandboxes/{id}/connect` and `/sandboxes/{id}/connect`:
/// running → 200 (the deadline never shortens); paused → resumed, 201.
/// Under the sandbox's lifecycle lock: connects that race each other or a
/// pause all end with it running, as E2B's (which waits out the change).
pub async fn connect(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Path(id): Path<String>,
    E2bJson(body): E2bJson<ConnectBody>,
) -> E2bResult<(StatusCode, Json<Value>)> {
    let timeout = timeout_of(body.timeout, DEFAULT_TIMEOUT)?;
    let c = find(&cp, &caller, &id).await?;
    let actor = Actor::key(&caller.0);
    let (code, c) = capsules::locked(&cp, &c, move |cp, now| async move {
        let c = still_there(now, &id)?;
        if state(&c) == Some("paused") {
            // (`memory: false` applies to a paused sandbox only)
            if body.memory == Some(false) {
                return Err(E2bError::bad_request(
                    "rebooting from the filesystem only is not supported",
                ));
            }
            return Ok((
                StatusCode::CREATED,
                resume_with(&cp, actor, &c, timeout).await?,
            ));
        }
        extend(&cp, &c, timeout).await?;
        Ok((StatusCode::OK, c))
    })
    .await?;
    Ok((code, Json(sandbox_json(&cp, &c))))
}

/// `POST /sandboxes/{id}/resume` (legacy): paused → 201; running → 409.
pub async fn resume(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Path(id): Path<String>,
    E2bJson(body): E2bJson<ConnectBody>,
) -> E2bResult<(StatusCode, Json<Value>)> {
    let timeout = timeout_of(body.timeout, DEFAULT_RESUME_TIMEOUT)?;
    let c = find(&cp, &caller, &id).await?;
    let actor = Actor::key(&caller.0);
    let resumed = capsules::locked(&cp, &c, move |cp, now| async move {
        let c = still_there(now, &id)?;
        if state(&c) != Some("paused") {
            return Err(E2bError::conflict(format!(
                "sandbox {} is already running",
                c.id
            )));
        }
        resume_with(&cp, actor, &c, timeout).await
    })
    .await?;
    Ok((StatusCode::CREATED, Json(sandbox_json(&cp, &resumed))))
}

// ---- metrics and logs ---------------------------------------------------

fn metric_json(c: &CapsuleRow, p: &MetricRow) -> Value {
    json!({
        "timestamp": rfc3339(p.at_ms),
        "timestampUnix": p.at_ms / 1000,
        "cpuCount": c.vcpus,
        "cpuUsedPct": p.cpu_pct,
        "memUsed": p.mem_bytes,
        "memTotal": c.memory_mb << 20,
        "memCache": 0,
        "diskUsed": p.disk_bytes,
        "diskTotal": c.disk_size_mb << 20,
    })
}

/// What E2B shows every: its metrics are collected every 5 s.
const E2B_METRIC_STEP_MS: i64 = 5_000;

/// A sandbox's samples, one per 5 s as E2B's: the agent's while it runs,
/// the saved ones when paused.
async fn samples(cp: &Cp, c: &CapsuleRow) -> E2bResult<Vec<MetricRow>> {
    use crate::api::stats::thin;
    if c.status != Status::Running {
        let saved = cp.db.saved_metrics(&c.id, 0).await?;
        return Ok(thin(saved, E2B_METRIC_STEP_MS, |p| p.at_ms));
    }
    let host = crate::api::host_of(cp, c)?;
    let m = host
        .rpc
        .get_metrics(capsules::cref(&c.id))
        .await
        .map_err(|e| E2bError::from(crate::error::ApiError::agent(&e)))?
        .into_owned();
    // thinned before the CPU % is taken, so that it is the mean of each 5 s
    let all = thin(
        crate::api::stats::history_all(&m),
        E2B_METRIC_STEP_MS,
        |p| p.at_ms,
    );
    Ok(crate::api::stats::points(&all, c.vcpus))
}

/// `GET /sandboxes/{id}/metrics?start=&end=` (Unix seconds).
pub async fn metrics(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> E2bResult<Json<Vec<Value>>> {
    // Unix seconds
    let (start, end) = (
        query_i64(&q, "start")?.map(|s| s.saturating_mul(1000)),
        query_i64(&q, "end")?.map(|s| s.saturating_mul(1000)),
    );
    let c = find(&cp, &caller, &id).await?;
    let pts = samples(&cp, &c).await?;
    Ok(Json(
        pts.iter()
            .filter(|p| start.is_none_or(|s| p.at_ms >= s) && end.is_none_or(|e| p.at_ms <= e))
            .map(|p| metric_json(&c, p))
            .collect(),
    ))
}

/// `GET /sandboxes/metrics?sandbox_ids=a,b`: each running sandbox's latest
/// sample.
pub async fn bulk_metrics(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Query(q): Query<HashMap<String, String>>,
) -> E2bResult<Json<Value>> {
    let ids: Vec<&str> = q
        .get("sandbox_ids")
        .map(|s| s.split(',').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    if ids.len() > MAX_LIST_LIMIT {
        return Err(E2bError::bad_request("at most 100 sandbox_ids"));
    }
    let mut out = serde_json::Map::new();
    for id in ids {
        let Ok(c) = find(&cp, &caller, id).await else {
            continue;
        };
        if c.status != Status::Running {
            continue;
        }
        if let Some(p) = samples(&cp, &c).await?.last() {
            out.insert(id.to_owned(), metric_json(&c, p));
        }
    }
    Ok(Json(json!({ "sandboxes": out })))
}

/// Log levels by severity.
const LEVELS: [&str; 4] = ["debug", "info", "warn", "error"];

fn severity(level: &str) -> usize {
    LEVELS.iter().position(|l| *l == level).unwrap_or(1)
}

fn query_i64(q: &HashMap<String, String>, k: &str) -> E2bResult<Option<i64>> {
    q.get(k)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| E2bError::bad_request(format!("{k} must be an integer")))
        })
        .transpose()
}

fn limit_of(q: &HashMap<String, String>) -> E2bResult<usize> {
    match query_i64(q, "limit")? {
        None => Ok(1000),
        Some(l) if (0..=10_000).contains(&l) => Ok(l as usize),
        Some(_) => Err(E2bError::bad_request("limit must be 0 to 10000")),
    }
}

fn entry_json(l: &LogLine) -> Value {
    json!({"timestamp": rfc3339_millis(l.at_ms), "message": l.message, "level": l.level, "fields": {}})
}

/// `GET /sandboxes/{id}/logs?start=&limit=`: what happened to the sandbox
/// (created, paused, resumed, timed out, …), oldest first, from `start`
/// (Unix ms).
pub async fn logs_v1(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> E2bResult<Json<Value>> {
    let (start, limit) = (query_i64(&q, "start")?.unwrap_or(0), limit_of(&q)?);
    let c = find(&cp, &caller, &id).await?;
    let lines: Vec<LogLine> = cp
        .db
        .logs(&c.id, start)
        .await?
        .into_iter()
        .take(limit)
        .collect();
    let logs: Vec<Value> = lines
        .iter()
        .map(|l| json!({"timestamp": rfc3339_millis(l.at_ms), "line": l.message}))
        .collect();
    let entries: Vec<Value> = lines.iter().map(entry_json).collect();
    Ok(Json(json!({"logs": logs, "logEntries": entries})))
}

/// `GET /v2/sandboxes/{id}/logs?cursor=&limit=&direction=&level=&search=`:
/// `forward` from `cursor` (Unix ms, default the start) or `backward` from
/// it (default now); `level` is the least severity shown; `search` a
/// substring of the message.
pub async fn logs_v2(
    State(cp): State<Arc<Cp>>,
    caller: E2bCaller,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> E2bResult<Json<Value>> {
    let (cursor, limit) = (query_i64(&q, "cursor")?, limit_of(&q)?);
    let backward = match q.get("direction").map(String::as_str) {
        None | Some("") | Some("forward") => false,
        Some("backward") => true,
        Some(d) => return Err(E2bError::bad_request(format!("invalid direction {d:?}"))),
    };
    let least = match q.get("level").filter(|l| !l.is_empty()) {
        None => 0,
        Some(l) if LEVELS.contains(&l.as_str()) => severity(l),
        Some(l) => return Err(E2bError::bad_request(format!("invalid level {l:?}"))),
    };
    let search = q.get("search").filter(|s| !s.is_empty());
    let c = find(&cp, &caller, &id).await?;
    let mut lines = cp.db.logs(&c.id, 0).await?;
    lines.retain(|l| {
        severity(&l.level) >= least && search.is_none_or(|s| l.message.contains(s.as_str()))
    });
    let picked: Vec<Value> = if backward {
        let until = cursor.unwrap_or(i64::MAX);
        lines
            .iter()
            .rev()
            .filter(|l| l.at_ms <= until)
            .take(limit)
            .map(entry_json)
            .collect()
    } else {
        let from = cursor.unwrap_or(0);
        lines
            .iter()
            .filter(|l| l.at_ms >= from)
            .take(limit)
            .map(entry_json)
            .collect()
    };
    Ok(Json(json!({ "logs": picked })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_that_made_a_sandbox_are_remembered() {
        let keys = Idempotency::default();
        let team = TeamId::random();
        let failed = keys.cell(&team, "failed");
        keys.forget_failed(&team, "failed", &failed);
        let made = keys.cell(&team, "made");
        made.set(CapsuleId::random()).unwrap();
        keys.forget_failed(&team, "made", &made); // (a late failure of a racing retry)
                                                  // a request still at it (a second holder of the cell) keeps the key
        let busy = keys.cell(&team, "busy");
        let waiting = keys.cell(&team, "busy");
        keys.forget_failed(&team, "busy", &busy);
        let mut left: Vec<String> = keys
            .map
            .lock()
            .unwrap()
            .keys()
            .map(|(_, k)| k.clone())
            .collect();
        left.sort();
        assert_eq!(left, ["busy", "made"]);
        drop(waiting);
        // a retry of the failed key starts afresh
        assert!(!Arc::ptr_eq(&failed, &keys.cell(&team, "failed")));
    }

    #[test]
    fn metadata_filter_undoes_the_sdks_encoding() {
        // what axum's Query leaves of e2b 2.63's `{"k": "v w/x"}`
        let m = parse_metadata_filter("k=v%2520w%252Fx");
        assert_eq!(m, BTreeMap::from([("k".into(), "v w/x".into())]));
        // two pairs, and the characters the encoding must survive
        let m = parse_metadata_filter("weird=a%2520b%252Fc%2526d%253De%2525f%252Bg&tag=t-1");
        assert_eq!(m["weird"], "a b/c&d=e%f+g");
        assert_eq!(m["tag"], "t-1");
        assert!(parse_metadata_filter("").is_empty());
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        assert_eq!(
            parse_cursor("17.cl-abc").unwrap(),
            (17, "cl-abc".to_owned())
        );
        assert!(parse_cursor("x.cl-abc").is_err());
        assert!(parse_cursor("nodot").is_err());
    }

    #[test]
    fn timeouts() {
        assert_eq!(timeout_of(None, 300).unwrap(), 300);
        assert_eq!(timeout_of(Some(0), 300).unwrap(), 0);
        assert_eq!(timeout_of(Some(-1), 300).unwrap_err().status, 400);
        assert_eq!(
            timeout_of(Some(MAX_TIMEOUT + 1), 300).unwrap_err().status,
            400
        );
    }
}
