//! OpenAI-style error bodies, as vLLM's server writes them, so clients of the
//! engines see the same shape whether the engine or the proxy refused.

/// The `type` vLLM uses for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        413 => "RequestEntityTooLargeError",
        422 => "UnprocessableEntityError",
        429 => "RateLimitError",
        502 => "BadGatewayError",
        503 => "ServiceUnavailableError",
        504 => "GatewayTimeoutError",
        _ if status >= 500 => "InternalServerError",
        _ => "BadRequestError",
    }
}

/// `{"error":{"message":…,"type":…,"param":null,"code":<status>}}`
pub fn error_body(status: u16, message: &str) -> Vec<u8> {
    let v = serde_json::json!({
        "error": {
            "message": message,
            "type": error_type(status),
            "param": null,
            "code": status,
        }
    });
    // Serialising a Value built from strings and integers cannot fail.
    serde_json::to_vec(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_escaping() {
        let b = error_body(400, "bad \"body\"\n");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["message"], "bad \"body\"\n");
        assert_eq!(v["error"]["type"], "BadRequestError");
        assert_eq!(v["error"]["code"], 400);
        assert!(v["error"]["param"].is_null());
        assert_eq!(error_type(504), "GatewayTimeoutError");
        assert_eq!(error_type(500), "InternalServerError");
        assert_eq!(error_type(599), "InternalServerError");
    }
}
