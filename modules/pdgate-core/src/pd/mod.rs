//! The P/D flow, free of nginx types: [`flow`] is the state machine every
//! P/D module runs (through the glue's driver); [`classify_prefill`] turns
//! what nginx reports of a finished prefill leg into its outcome.

use std::fmt;

pub mod flow;

/// nginx's `NGX_HTTP_REQUEST_TIME_OUT` (the client stalled).
const CLIENT_TIMEOUT: i64 = 408;
/// nginx's `NGX_HTTP_CLIENT_CLOSED_REQUEST`.
const CLIENT_CLOSED: i64 = 499;

/// Why a prefill subrequest produced no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillFailure {
    /// The answer did not fit `subrequest_output_buffer_size`.
    BufferTooSmall,
    /// The header came but the body did not end (the connection was reset
    /// or closed, or stalled past the read timeout).
    CutOff,
    /// Connect, send or read timed out (`proxy_*_timeout`).
    Timeout,
    /// No prefill server could be reached.
    Unreachable,
    /// The subrequest ended with another nginx status (e.g. 404: no such
    /// internal location).
    Status(i64),
    /// An internal nginx error.
    Internal,
}

impl PrefillFailure {
    /// True when the decode may be tried alone after this failure
    /// (`prefill_fallback decode`): the prefill servers failed, not the
    /// request or the proxy (a too small buffer is a configuration matter,
    /// an internal error is ours).
    pub fn may_fall_back(self) -> bool {
        match self {
            PrefillFailure::Unreachable | PrefillFailure::Timeout | PrefillFailure::CutOff => true,
            PrefillFailure::Status(s) => s >= 500,
            PrefillFailure::BufferTooSmall | PrefillFailure::Internal => false,
        }
    }

    /// True when the prefill server gave no answer (it could not be
    /// reached, timed out, or broke off): another server may be tried, and
    /// this one counts a failure (nginx's `max_fails`).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            PrefillFailure::Unreachable | PrefillFailure::Timeout | PrefillFailure::CutOff
        )
    }

    /// The HTTP status the client receives.
    pub fn http_status(self) -> u16 {
        match self {
            PrefillFailure::Timeout => 504,
            _ => 502,
        }
    }
}

impl fmt::Display for PrefillFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrefillFailure::BufferTooSmall => f.write_str(
                "prefill answer is larger than the subrequest buffer, \
                 raise \"subrequest_output_buffer_size\" in the prefill location",
            ),
            PrefillFailure::CutOff => f.write_str("prefill answer was cut off after its header"),
            PrefillFailure::Timeout => f.write_str("prefill upstream timed out"),
            PrefillFailure::Unreachable => f.write_str("prefill upstream is unreachable"),
            PrefillFailure::Status(s) => write!(f, "prefill subrequest failed with status {s}"),
            PrefillFailure::Internal => f.write_str("prefill subrequest failed"),
        }
    }
}

/// What to do with the main request once the prefill subrequest is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillOutcome {
    /// 2xx answer: build the decode body and let the request go on.
    Decode,
    /// The prefill server answered with an error: give its status and body
    /// to the client unchanged.
    PassThrough { status: u16 },
    /// No usable answer: answer the client with an error of our own.
    Fail(PrefillFailure),
    /// The client went away; nginx terminates the request, nothing is sent.
    ClientGone,
}

/// Classifies a finished prefill subrequest from the `rc` its post handler
/// got, the subrequest's response status, whether its in-memory buffer was
/// filled to the end, and whether the answer's body ended as it should.
///
/// An overflow of the in-memory buffer wins over `rc`: nginx may still have
/// read the whole answer from the prefill (`rc == 0`) after the capture
/// filter gave up on it. A body that did not end is a failure whatever the
/// status: once a header went through, nginx finalizes a subrequest whose
/// upstream broke off with `rc == 0`.
pub fn classify_prefill(rc: i64, status: u64, buffer_full: bool, complete: bool) -> PrefillOutcome {
    match rc {
        CLIENT_TIMEOUT | CLIENT_CLOSED => PrefillOutcome::ClientGone,
        _ if buffer_full => PrefillOutcome::Fail(PrefillFailure::BufferTooSmall),
        0 if !complete && status != 0 => PrefillOutcome::Fail(PrefillFailure::CutOff),
        0 => match status {
            200..=299 => PrefillOutcome::Decode,
            100..=199 | 300..=599 => PrefillOutcome::PassThrough { status: status as u16 },
            _ => PrefillOutcome::Fail(PrefillFailure::Internal),
        },
        502 => PrefillOutcome::Fail(PrefillFailure::Unreachable),
        504 => PrefillOutcome::Fail(PrefillFailure::Timeout),
        300..=599 => PrefillOutcome::Fail(PrefillFailure::Status(rc)),
        _ => PrefillOutcome::Fail(PrefillFailure::Internal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PrefillFailure::*;
    use PrefillOutcome::*;

    #[test]
    fn table() {
        let cases = [
            ((0, 200, false), Decode),
            ((0, 500, false), PassThrough { status: 500 }),
            ((0, 201, false), Decode),
            ((0, 400, false), PassThrough { status: 400 }),
            ((0, 500, false), PassThrough { status: 500 }),
            ((0, 0, false), Fail(Internal)),
            ((-1, 200, true), Fail(BufferTooSmall)),
            ((0, 200, true), Fail(BufferTooSmall)),
            ((499, 200, true), ClientGone),
            ((-1, 200, false), Fail(Internal)),
            ((502, 0, false), Fail(Unreachable)),
            ((504, 0, false), Fail(Timeout)),
            ((404, 404, false), Fail(Status(404))),
            ((499, 0, false), ClientGone),
            ((408, 0, false), ClientGone),
        ];
        for ((rc, st, full), want) in cases {
            assert_eq!(classify_prefill(rc, st, full, true), want, "rc={rc} status={st}");
        }
        // A body that did not end fails whatever its status, but the client
        // leaving and an overflow say more.
        assert_eq!(classify_prefill(0, 200, false, false), Fail(CutOff));
        assert_eq!(classify_prefill(0, 400, false, false), Fail(CutOff));
        assert_eq!(classify_prefill(499, 200, false, false), ClientGone);
        assert_eq!(classify_prefill(0, 200, true, false), Fail(BufferTooSmall));
        assert_eq!(classify_prefill(502, 0, false, false), Fail(Unreachable));
        assert_eq!(CutOff.http_status(), 502);
        assert_eq!(Timeout.http_status(), 504);
        assert_eq!(BufferTooSmall.http_status(), 502);
        assert!(BufferTooSmall.to_string().contains("subrequest_output_buffer_size"));
    }
}
