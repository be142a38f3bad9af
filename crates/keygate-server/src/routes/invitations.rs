//! Admin API: invitations to the developer portal (for `portal.signup = "invite"`). An invitation is a
//! link sealed with the master key for one email address; it works for a number of days, and for one
//! account (a sign-up with an address that has an account is refused).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::AdminCaller;
use crate::error::{ApiError, ApiJson, ApiResult, ErrorBody};
use crate::routes::common::audit;
use crate::state::AppState;
use crate::time::rfc3339;

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(create_invitation))
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInvitation {
    /// Who is invited: the account's address.
    pub email: String,
    /// How long the link works, 1–90 days (default 7).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_days: Option<i64>,
    /// Also mail the link to the address (through `mail.smtp_url`, or the log in its test mode).
    #[serde(default)]
    pub send: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Invitation {
    pub email: String,
    /// The sign-up link. Anyone holding it can sign up with this address: give it only to its owner.
    pub url: String,
    pub expires_at: String,
    /// Whether it was mailed.
    pub sent: bool,
}

/// Invite someone to the developer portal: a sign-up link for one email address.
#[utoipa::path(post, path = "/v1/portal/invitations", tag = "users", request_body = CreateInvitation,
    responses((status = 201, body = Invitation), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_invitation(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiJson(req): ApiJson<CreateInvitation>,
) -> ApiResult<(StatusCode, Json<Invitation>)> {
    let email = req.email.trim().to_string();
    crate::routes::users::check_email(&Some(email.clone()))?;
    if email.is_empty() {
        return Err(ApiError::invalid("email", "give the address to invite"));
    }
    if let Some(d) = req.expires_in_days
        && !(1..=90).contains(&d)
    {
        return Err(ApiError::invalid("expires_in_days", "must be between 1 and 90"));
    }
    let (url, expires_at) = crate::console::portal::invitation(&state, &email, req.expires_in_days)
        .ok_or_else(|| ApiError::internal("cannot seal an invitation", "no master key"))?;
    let now = state.now();
    // The address only (never the link, which admits whoever holds it).
    let record = audit(
        &actor,
        now,
        "portal.invite",
        "invitation",
        &email,
        json!({"email": email, "expires_at": rfc3339(expires_at)}),
    )?;
    state.store.record_audit(&record).await?;
    let sent = if req.send {
        let body = format!(
            "Hello,\n\nyou are invited to the developer portal. Make your account with this link (it works until {}):\n\n{url}\n",
            rfc3339(expires_at)
        );
        state.mailer.send(&email, "Your invitation to the developer portal", &body).await.map_err(|e| {
            ApiError::new(
                crate::error::ErrorCode::UpstreamUnavailable,
                format!("the invitation could not be mailed: {e}"),
            )
        })?;
        true
    } else {
        false
    };
    Ok((StatusCode::CREATED, Json(Invitation { email, url, expires_at: rfc3339(expires_at), sent })))
}
