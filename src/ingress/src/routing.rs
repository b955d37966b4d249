//! The routing admin API (agent profiles: create, replace, patch, delete, get, list,
//! activate/deactivate, explain, export, import) and `POST /v1/routing/resolve`, the
//! synchronous routing contract for carriers, SIP proxies and LiveKit's draft dynamic
//! dispatch rule. Reads come from this instance's in-memory table, which an instance's own
//! writes update at once and every other instance's within a second.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use callfleet_core::domain::phone::{redact_number, E164};
use callfleet_core::domain::routing::{
    merge_patch, Decision, Profile, ProfileFilter, ProfileInput, ProfileStatus, RouteQuery,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{body_bytes, from_value, parse_json, ApiError, IngressState};

/// Largest import body (100,000 profiles of ~1 KiB fit).
pub const IMPORT_MAX_BYTES: usize = 256 * 1024 * 1024;
const MAX_PAGE: usize = 500;

fn unavailable(error: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %error, "routing store unavailable");
    ApiError::Unavailable { retry_after_s: 2 }
}

fn profile_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|_| ApiError::NotFound("no such profile".into()))
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

fn validate(
    state: &IngressState,
    input: ProfileInput,
    id: Option<&str>,
    existing: Option<&Profile>,
    prefix: &str,
) -> Result<Profile, ApiError> {
    input
        .into_profile(id, state.defaults.region, existing, state.clock.now())
        .map_err(|e| invalid(format!("{prefix}{}", e.field), e.message))
}

/// Brings this instance's table up to the store after a write, so what was just written
/// is served here at once (other instances follow within a second). A failure only
/// delays that; the write itself succeeded.
async fn caught_up(state: &IngressState) {
    if let Err(e) = state.routing.refresh().await {
        tracing::warn!(error = %e, "routing table not refreshed after a write; the poller will");
    }
}

/// Stores `profile` and serves it here at once.
async fn save(state: &IngressState, profile: Profile) -> Result<Profile, ApiError> {
    state
        .routing
        .store()
        .put(&profile)
        .await
        .map_err(unavailable)?;
    caught_up(state).await;
    Ok(profile)
}

/// The profile as stored (not this instance's copy, which may be a moment behind): what a
/// read-modify-write starts from.
async fn current(state: &IngressState, id: &str) -> Result<Profile, ApiError> {
    state
        .routing
        .store()
        .get(id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| ApiError::NotFound(format!("no profile {id}")))
}

/// `POST /v1/routing/profiles`: 201; 409 when the id is taken.
pub async fn create(
    State(state): State<IngressState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let input: ProfileInput = parse_json(&body_bytes(body, state.max_body_bytes)?)?;
    let profile = validate(&state, input, None, None, "")?;
    let taken = state.routing.table().get(&profile.id).is_some()
        || state
            .routing
            .store()
            .get(&profile.id)
            .await
            .map_err(unavailable)?
            .is_some();
    if taken {
        return Err(ApiError::Conflict(format!(
            "profile {} exists: PUT or PATCH /v1/routing/profiles/{} changes it",
            profile.id, profile.id
        )));
    }
    let profile = save(&state, profile).await?;
    Ok((StatusCode::CREATED, Json(profile)).into_response())
}

/// `PUT /v1/routing/profiles/{id}`: creates (201) or replaces (200) the whole profile.
pub async fn replace(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = profile_id(id)?;
    let input: ProfileInput = parse_json(&body_bytes(body, state.max_body_bytes)?)?;
    let existing = state.routing.store().get(&id).await.map_err(unavailable)?;
    let profile = validate(&state, input, Some(&id), existing.as_ref(), "")?;
    let status = if existing.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(save(&state, profile).await?)).into_response())
}

/// `PATCH /v1/routing/profiles/{id}`: a JSON merge patch (RFC 7396) of the profile.
pub async fn patch(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Profile>, ApiError> {
    let id = profile_id(id)?;
    let patch: Value = parse_json(&body_bytes(body, state.max_body_bytes)?)?;
    if !patch.is_object() {
        return Err(invalid("body", "must be a JSON object (a merge patch)"));
    }
    let existing = current(&state, &id).await?;
    let mut merged = existing.to_input();
    merge_patch(&mut merged, &patch);
    let input: ProfileInput = from_value(merged)?;
    let profile = validate(&state, input, Some(&id), Some(&existing), "")?;
    Ok(Json(save(&state, profile).await?))
}

async fn set_status(
    state: IngressState,
    id: Result<Path<String>, PathRejection>,
    status: ProfileStatus,
) -> Result<Json<Profile>, ApiError> {
    let id = profile_id(id)?;
    let mut profile = current(&state, &id).await?;
    profile.status = status;
    profile.updated_at = state.clock.now();
    Ok(Json(save(&state, profile).await?))
}

/// `POST /v1/routing/profiles/{id}/activate`
pub async fn activate(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Profile>, ApiError> {
    set_status(state, id, ProfileStatus::Active).await
}

/// `POST /v1/routing/profiles/{id}/deactivate`
pub async fn deactivate(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Profile>, ApiError> {
    set_status(state, id, ProfileStatus::Inactive).await
}

/// `DELETE /v1/routing/profiles/{id}`: 204.
pub async fn delete(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = profile_id(id)?;
    match state
        .routing
        .store()
        .delete(&id)
        .await
        .map_err(unavailable)?
    {
        Some(_) => {
            caught_up(&state).await;
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(ApiError::NotFound(format!("no profile {id}"))),
    }
}

/// `GET /v1/routing/profiles/{id}`
pub async fn get_one(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Profile>, ApiError> {
    let id = profile_id(id)?;
    state
        .routing
        .table()
        .get(&id)
        .map(|p| Json(p.profile.clone()))
        .ok_or_else(|| ApiError::NotFound(format!("no profile {id}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    number: Option<String>,
    status: Option<String>,
    organization: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ProfilePage {
    profiles: Vec<Profile>,
    next_cursor: Option<String>,
}

/// Query parameters, or a 422 naming the parameter (serde's "missing field `to`" becomes
/// field `to`, "is required").
pub(crate) fn query<T>(params: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    params.map(|Query(p)| p).map_err(|e| {
        let text = e.body_text();
        let named = |marker: &str| {
            text.split_once(marker)
                .and_then(|(_, rest)| rest.split('`').next())
                .map(str::to_owned)
        };
        if let Some(field) = named("missing field `") {
            invalid(field, "is required")
        } else if let Some(field) = named("unknown field `") {
            invalid(field, "is not a parameter of this route")
        } else {
            invalid("query", text)
        }
    })
}

fn number(state: &IngressState, field: &str, raw: &str) -> Result<E164, ApiError> {
    E164::parse(raw, state.defaults.region).map_err(|e| invalid(field, e.to_string()))
}

/// `GET /v1/routing/profiles?number=&status=&organization=&limit=&cursor=`: id order.
pub async fn list(
    State(state): State<IngressState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ProfilePage>, ApiError> {
    let params = query(params)?;
    let status = match params.status.as_deref() {
        None => None,
        Some("active") => Some(ProfileStatus::Active),
        Some("inactive") => Some(ProfileStatus::Inactive),
        Some(_) => return Err(invalid("status", "must be active or inactive")),
    };
    let filter = ProfileFilter {
        number: params
            .number
            .as_deref()
            .map(|n| number(&state, "number", n).map(|n| n.as_str().to_owned()))
            .transpose()?,
        status,
        organization: params.organization,
    };
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(invalid("limit", format!("must be 1 to {MAX_PAGE}")));
    }
    let table = state.routing.table();
    let page: Vec<Profile> = table
        .list(&filter, params.cursor.as_deref(), limit + 1)
        .into_iter()
        .cloned()
        .collect();
    let more = page.len() > limit;
    let profiles: Vec<Profile> = page.into_iter().take(limit).collect();
    let next_cursor = more
        .then(|| profiles.last().map(|p| p.id.clone()))
        .flatten();
    Ok(Json(ProfilePage {
        profiles,
        next_cursor,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainParams {
    to: String,
    from: Option<String>,
    at: Option<String>,
    trunk_id: Option<String>,
    rule_id: Option<String>,
}

fn decision_json(decision: &Decision, at: DateTime<Utc>) -> Value {
    let profile = decision.profile();
    json!({
        "profile": profile,
        "decision": decision.reason.to_string(),
        "result": decision.reason.result(),
        "cause": decision.reason.cause().map(|c| c.as_str()),
        "considered": decision.considered,
        "at": at,
    })
}

/// `GET /v1/routing/explain?to=&from=&at=&trunk_id=&rule_id=`: which profile would take
/// this call, and why (nothing is claimed or counted).
pub async fn explain(
    State(state): State<IngressState>,
    params: Result<Query<ExplainParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = query(params)?;
    let to = number(&state, "to", &params.to)?;
    let from = params
        .from
        .as_deref()
        .map(|f| number(&state, "from", f))
        .transpose()?;
    let at = match params.at.as_deref() {
        None => state.clock.now(),
        Some(at) => DateTime::parse_from_rfc3339(at)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| {
                invalid(
                    "at",
                    "must be an RFC 3339 time such as 2026-11-20T17:00:00Z",
                )
            })?,
    };
    let q = RouteQuery {
        to: to.as_str(),
        from: from.as_ref().map(E164::as_str),
        trunk_id: params.trunk_id.as_deref(),
        rule_id: params.rule_id.as_deref(),
        at,
        call_key: "explain",
    };
    let decision = state
        .routing
        .table()
        .resolve(&q, state.routing.loads().as_ref());
    Ok(Json(decision_json(&decision, at)))
}

/// `GET /v1/routing/export`: every profile, in a document `import` takes back.
pub async fn export(State(state): State<IngressState>) -> Json<Value> {
    let table = state.routing.table();
    let profiles: Vec<&Profile> = table.all().collect();
    Json(json!({"version": state.routing.version(), "profiles": profiles}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    mode: Option<String>,
}

/// `POST /v1/routing/import?mode=merge|replace` with `{"profiles": [...]}` (an export) or
/// a bare array. Every profile is validated before anything is written.
pub async fn import(
    State(state): State<IngressState>,
    params: Result<Query<ImportParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let replace_all = match query(params)?.mode.as_deref() {
        None | Some("merge") => false,
        Some("replace") => true,
        Some(_) => return Err(invalid("mode", "must be merge or replace")),
    };
    let document: Value = parse_json(&body_bytes(body, IMPORT_MAX_BYTES)?)?;
    let (items, prefix) = match document {
        Value::Array(items) => (items, ""),
        Value::Object(mut map) => match map.remove("profiles") {
            Some(Value::Array(items)) => (items, "profiles"),
            _ => return Err(invalid("profiles", "must be an array of profiles")),
        },
        _ => return Err(invalid("body", "must be an array of profiles or an export")),
    };
    let table = state.routing.table();
    let mut profiles = Vec::with_capacity(items.len());
    let mut seen = std::collections::HashSet::new();
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("{prefix}[{i}].");
        let input: ProfileInput = from_value(item).map_err(|e| match e {
            ApiError::Invalid { field, message } => invalid(format!("{at}{field}"), message),
            other => other,
        })?;
        // Ids make an import repeatable: without one, every run would add copies.
        let Some(id) = input.id.clone() else {
            return Err(invalid(
                format!("{at}id"),
                "is required in an import (an export carries every id)",
            ));
        };
        let existing = table.get(&id).map(|p| p.profile.clone());
        let mut profile = validate(&state, input, None, existing.as_ref(), &at)?;
        if !seen.insert(profile.id.clone()) {
            return Err(invalid(format!("{at}id"), "appears twice in the import"));
        }
        if let Some(existing) = existing {
            profile.updated_at = existing.updated_at;
            if profile == existing {
                // Unchanged: not written again (importing the same document twice is a
                // no-op, and an export imports back as it was).
                continue;
            }
            profile.updated_at = state.clock.now();
        }
        profiles.push(profile);
    }
    let version = state
        .routing
        .store()
        .import(&profiles, replace_all.then_some(&seen))
        .await
        .map_err(unavailable)?;
    let count = profiles.len();
    let unchanged = seen.len() - count;
    let deletes: Vec<String> = if replace_all {
        table
            .all()
            .filter(|p| !seen.contains(&p.id))
            .map(|p| p.id.clone())
            .collect()
    } else {
        Vec::new()
    };
    let deleted = deletes.len();
    caught_up(&state).await;
    Ok(Json(
        json!({"imported": count, "unchanged": unchanged, "deleted": deleted, "version": version}),
    ))
}

/// The SIP-dispatch seed's request.
#[derive(Debug, Deserialize)]
pub struct SeedUser {
    number: String,
    #[serde(default)]
    name: Option<String>,
}

impl SeedUser {
    fn name(&self) -> Option<&str> {
        self.name.as_deref().filter(|n| !n.is_empty())
    }
}

#[derive(Debug, Deserialize)]
pub struct SeedRequest {
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    trunk_id: Option<String>,
    #[serde(default)]
    sip_call_id: Option<String>,
    #[serde(default)]
    rule_id: Option<String>,
    from_user: SeedUser,
    to_user: SeedUser,
}

/// LiveKit's draft dynamic dispatch request (livekit/protocol PR #959).
#[derive(Debug, Deserialize)]
pub struct DynamicDispatchRequest {
    #[serde(default)]
    trunk_id: Option<String>,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    from_user: Option<String>,
    to_user: String,
    #[serde(default)]
    #[allow(dead_code)]
    project_id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    from_host: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    to_host: Option<String>,
}

/// A room name unique per call that names the routed agent: `in-<agent>-<random>`.
fn room_name(agent: &str) -> String {
    format!(
        "in-{agent}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// `POST /v1/routing/resolve`: the synchronous contract. Two request shapes: the
/// SIP-dispatch seed's (`from_user`/`to_user` objects) answered with `room_name`,
/// `participant_identity`, `participant_name`, `agent`; and LiveKit's draft dynamic
/// dispatch (`to_user` a string) answered with `dispatch_action`, `room_name`, `metadata`,
/// `attributes`. Memory only: no store round trip.
pub async fn resolve(
    State(state): State<IngressState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let document: Value = parse_json(&body_bytes(body, state.max_body_bytes)?)?;
    let seed = document.get("to_user").is_some_and(Value::is_object);
    let now = state.clock.now();
    if seed {
        let request: SeedRequest = from_value(document)?;
        let to = number(&state, "to_user.number", &request.to_user.number)?;
        let from = E164::parse(&request.from_user.number, state.defaults.region).ok();
        let key = request
            .sip_call_id
            .clone()
            .or(request.call_id.clone())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let q = RouteQuery {
            to: to.as_str(),
            from: from.as_ref().map(E164::as_str),
            trunk_id: request.trunk_id.as_deref(),
            rule_id: request.rule_id.as_deref(),
            at: now,
            call_key: &key,
        };
        let decision = state.routing.resolve(&q, state.routing.loads().as_ref());
        let Some(profile) = decision.profile() else {
            return Err(ApiError::NotFound(format!(
                "no profile takes calls to {} now ({})",
                to.as_str(),
                decision.reason
            )));
        };
        let caller = from
            .as_ref()
            .map(|f| f.as_str().to_owned())
            .unwrap_or_else(|| request.from_user.number.clone());
        let participant_name = request
            .from_user
            .name()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("Phone {}", last4(&caller)));
        let body = json!({
            "room_name": room_name(&profile.agent_name),
            "participant_identity": format!("sip_{caller}"),
            "participant_name": participant_name,
            "agent": {
                "agent_name": profile.agent_name,
                "profile_id": profile.id,
                "metadata": profile.metadata,
            },
            "decision": decision.reason.to_string(),
            "dialed_name": request.to_user.name(),
        });
        return Ok(Json(body).into_response());
    }
    let request: DynamicDispatchRequest = from_value(document)?;
    let to = number(&state, "to_user", &request.to_user)?;
    let from = request
        .from_user
        .as_deref()
        .and_then(|f| E164::parse(f, state.defaults.region).ok());
    let key = request
        .call_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let q = RouteQuery {
        to: to.as_str(),
        from: from.as_ref().map(E164::as_str),
        trunk_id: request.trunk_id.as_deref(),
        rule_id: None,
        at: now,
        call_key: &key,
    };
    let decision = state.routing.resolve(&q, state.routing.loads().as_ref());
    let body = match decision.profile() {
        Some(profile) => json!({
            "dispatch_action": "accept",
            "room_name": room_name(&profile.agent_name),
            "metadata": profile.metadata.to_string(),
            "attributes": {
                "callfleet.profileID": profile.id,
                "callfleet.agentName": profile.agent_name,
                "callfleet.decision": decision.reason.to_string(),
            },
        }),
        None => json!({
            "dispatch_action": "reject",
            "reject_reason": format!("no profile takes calls to {} now ({})", redact_number(to.as_str()), decision.reason),
        }),
    };
    Ok(Json(body).into_response())
}

fn last4(number: &str) -> String {
    let chars: Vec<char> = number.chars().collect();
    chars[chars.len().saturating_sub(4)..].iter().collect()
}
