//! JetStream API errors: the codes of nats-server's `server/errors.json`
//! that natswal answers with, in JetStream's shape
//! (`{"code","err_code","description"}`). Clients branch on `err_code`
//! (10059: no such stream, 10037: no such message), so each refusal uses
//! the code a JetStream server would, with natswal's reason in the
//! description.

use serde::Serialize;

/// One JetStream API error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JsError {
    /// The HTTP-like status (400, 404, 412, 500, 503).
    pub code: u16,
    /// JetStream's error identifier.
    pub err_code: u32,
    pub description: String,
}

impl JsError {
    fn new(code: u16, err_code: u32, description: impl Into<String>) -> JsError {
        JsError {
            code,
            err_code,
            description: description.into(),
        }
    }

    /// JSBadRequestErr, with the reason.
    pub fn bad_request(reason: &str) -> JsError {
        JsError::new(400, 10003, format!("bad request: {reason}"))
    }

    /// JSInvalidJSONErr.
    pub fn invalid_json(error: &serde_json::Error) -> JsError {
        JsError::new(400, 10025, format!("invalid JSON: {error}"))
    }

    /// JSStreamNotFoundErr.
    pub fn stream_not_found() -> JsError {
        JsError::new(404, 10059, "stream not found")
    }

    /// JSNoMessageFoundErr.
    pub fn no_message() -> JsError {
        JsError::new(404, 10037, "no message found")
    }

    /// JSRequiredApiLevelErr.
    pub fn required_api_level() -> JsError {
        JsError::new(412, 10185, "JetStream minimum api level required")
    }

    /// JSStreamNameExistErr: a create or update naming an existing stream
    /// with another configuration; `differences` says which fields.
    pub fn stream_name_exists(differences: &str) -> JsError {
        JsError::new(
            400,
            10058,
            format!(
                "stream name already in use with a different configuration ({differences}); natswal's streams are configured in natswal's configuration file"
            ),
        )
    }

    /// JSStreamCreateErrF: natswal creates streams from its own
    /// configuration only.
    pub fn create_refused(stream: &str) -> JsError {
        JsError::new(
            500,
            10049,
            format!(
                "natswal does not create streams through the JetStream API: add a [[streams]] table named '{stream}' to natswal's configuration"
            ),
        )
    }

    /// The `{err}` errors of an operation natswal refuses (deleting,
    /// purging, ...): `err_code` is the operation's own.
    pub fn refused(code: u16, err_code: u32, reason: &str) -> JsError {
        JsError::new(code, err_code, reason.to_string())
    }

    /// JSStreamInvalidErr: the stream cannot serve the request (a read
    /// failed); the description says why.
    pub fn stream_invalid(reason: &str) -> JsError {
        JsError::new(500, 10096, format!("stream not valid: {reason}"))
    }

    /// A request natswal's `[[access]]` rules refuse. JetStream has no
    /// code of its own for it (NATS permissions stop such requests before
    /// JetStream sees them): 403 with the code of a bad request.
    pub fn forbidden(reason: &str) -> JsError {
        JsError::new(403, 10003, format!("forbidden: {reason}"))
    }
}
