//! The P/D request flow as a state machine, for every protocol.
//!
//! One request of a P/D location goes through at most three stages: the
//! encoder stage (E/P/D, one encoder request per media item), the prefill
//! leg and the decode leg. How the prefill and the decode follow each other
//! is the protocol's [`Shape`]:
//! - [`Shape::Sequential`]: vLLM NIXL and SGLang `p_before_d`: the decode
//!   starts after a 2xx prefill;
//! - [`Shape::Together`]: SGLang `pd_together`: both legs start at once,
//!   the decode through the location's `proxy_pass`;
//! - [`Shape::DecodeOnly`]: `prefill off` (a combined engine after the
//!   encoder stage).
//!
//! The glue's driver feeds [`Event`]s in and executes the [`Step`] each one
//! returns: what to cancel, which legs' counters to release, and what to do
//! next. The machine also keeps which legs hold counters, so that every
//! path that ends a request releases each exactly once; the tests below
//! check it for every event in every state.

use super::{PrefillFailure, PrefillOutcome};
use crate::encode::{Decision, EncodeFailure, EncodeOutcome, FanOut};

/// How the prefill and decode legs follow each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// No prefill leg: the request goes on to the decode (`prefill off`).
    DecodeOnly,
    /// The decode starts after a 2xx prefill.
    Sequential,
    /// Both legs start at once (SGLang `pd_together`).
    Together,
}

/// A location's flow: an encoder stage or not, then the legs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub encode: bool,
    pub shape: Shape,
    /// Sequential: how many times a prefill that failed without an answer
    /// (unreachable, timed out, cut off) is tried again on another server,
    /// before anything reached the client.
    pub retries: u8,
    /// Sequential: when the prefill failed (no server answered, or it
    /// answered 5xx) and no retry is left, send the request to the decode
    /// alone, which computes the prompt itself (`prefill_fallback decode`),
    /// instead of answering an error.
    pub fallback: bool,
}

/// A set of legs (bit set): the legs holding counters, or to cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Legs(u8);

impl Legs {
    pub const NONE: Legs = Legs(0);
    pub const ENCODERS: Legs = Legs(1);
    pub const PREFILL: Legs = Legs(2);
    pub const DECODE: Legs = Legs(4);

    pub fn contains(self, other: Legs) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    #[must_use]
    pub fn with(self, other: Legs) -> Legs {
        Legs(self.0 | other.0)
    }

    #[must_use]
    pub fn without(self, other: Legs) -> Legs {
        Legs(self.0 & !other.0)
    }
}

/// How a leg running beside the decode is doing (pd_together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Running,
    /// Ended well (prefill) or sent its header (decode).
    Ok,
}

/// Where a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Waiting for the client body.
    ReadingBody,
    /// The encoder requests run.
    Encoding(FanOut),
    /// Sequential: the prefill runs (try `attempt`, from 0), the main
    /// request waits.
    Prefilling { attempt: u8 },
    /// Sequential: the prefill failed without an answer; the driver looks
    /// for another server ([`Event::Retry`]).
    Retrying { failure: PrefillFailure, attempt: u8 },
    /// Together: both legs run; `decode` is `Ok` once its header went out.
    Together { prefill: Side, decode: Side },
    /// Together: the decode ended while the prefill still runs; it gets a
    /// grace period to answer (its KV is handed over, or of no use), then
    /// it is stopped, so a hung prefill cannot hold a finished request.
    Lingering,
    /// The decode runs through the location's `proxy_pass`; the flow has
    /// nothing left to decide but its end.
    Decoding,
    /// Finished; late events are ignored.
    Done(End),
}

/// How a request ended, as far as the flow is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The decode answered (whatever its status: the client got it).
    Decoded,
    /// Refused before any leg (bad body, no server, …).
    Refused { status: u16 },
    /// The prefill's own error answer went to the client.
    PassedThrough { status: u16 },
    /// A stage failed; the client got our error (or, after the decode's
    /// header, a cut connection).
    Failed(Failure),
    /// The client went away.
    ClientGone,
}

/// A failed stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Encoder {
        index: usize,
        failure: EncodeFailure,
    },
    Prefill(PrefillFailure),
    /// pd_together: the prefill answered this non-2xx status.
    PrefillStatus(u16),
    /// The next leg could not be started (an allocation, in practice).
    Internal,
}

impl Failure {
    /// The HTTP status the client receives.
    pub fn http_status(&self) -> u16 {
        match self {
            Failure::Encoder { .. } => 502,
            Failure::Prefill(f) => f.http_status(),
            Failure::PrefillStatus(s) if (400..600).contains(s) => *s,
            Failure::PrefillStatus(_) => 502,
            Failure::Internal => 500,
        }
    }

    /// The stage that failed, as metrics name it.
    pub fn stage(&self) -> &'static str {
        match self {
            Failure::Encoder { .. } => "encode",
            Failure::Prefill(_) | Failure::PrefillStatus(_) => "prefill",
            Failure::Internal => "proxy",
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The body is in and acceptable; `media` items need encoding.
    BodyReady { media: usize },
    /// The body (or the request) is refused with `status`.
    Refused { status: u16 },
    /// Encoder request `index` ended.
    EncoderEnded { index: usize, outcome: EncodeOutcome },
    /// The prefill leg ended.
    PrefillEnded(PrefillOutcome),
    /// The decode's response header is going to the client.
    DecodeHeader { status: u16 },
    /// The decode leg ended (its upstream was finalized).
    DecodeEnded,
    /// Starting the step the machine asked for failed.
    StartFailed,
    /// The grace period of a lingering prefill is over.
    GraceExpired,
    /// After [`Next::RetryPrefill`]: another prefill is prepared (`ready`),
    /// or there is none to try.
    Retry { ready: bool },
    /// The client went away (or nginx terminated the request).
    ClientGone,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing: wait for the next event.
    Wait,
    /// Start one encoder request per media item.
    StartEncoders,
    /// Start the prefill leg; the main request waits for it.
    StartPrefill,
    /// Prepare the prefill again on another server, then say [`Event::Retry`].
    RetryPrefill,
    /// Start the prefill leg in the background and let the main request go
    /// on to the decode at once.
    StartTogether,
    /// Install the decode body and let the request go on to `proxy_pass`.
    Decode,
    /// The prefill failed and the flow falls back: install a decode body
    /// without prefill results (the decode computes the prompt) and go on
    /// to `proxy_pass`.
    DecodeAlone,
    /// Answer the client with the prefill's own answer and this status.
    PassThrough {
        status: u16,
    },
    /// Answer the client with our JSON error (the driver has the message
    /// for a refusal; [`Failure`] says it for a failure).
    Refuse {
        status: u16,
    },
    Fail(Failure),
    /// The client already has the decode's header: cut the request.
    Terminate,
    /// Give the prefill still running a grace period ([`Event::GraceExpired`]).
    Linger,
    /// The request is over for the flow (the client left, or a late event).
    Ignore,
}

/// The driver's orders for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Legs to stop now (their upstream connections closed).
    pub cancel: Legs,
    /// Legs whose counters to release now.
    pub release: Legs,
    pub next: Next,
}

/// One request's flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    spec: Spec,
    state: State,
    /// Legs holding counters (the driver's reservations).
    held: Legs,
}

impl Flow {
    pub fn new(spec: Spec) -> Flow {
        Flow { spec, state: State::ReadingBody, held: Legs::NONE }
    }

    pub fn spec(&self) -> Spec {
        self.spec
    }

    /// A flow with a prefill or an encoder stage (not a location that only
    /// strips the reserved keys on the way to an engine).
    pub fn is_pd(&self) -> bool {
        self.spec.encode || self.spec.shape != Shape::DecodeOnly
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Legs holding counters now.
    pub fn held(&self) -> Legs {
        self.held
    }

    /// The driver reserved counters for `legs` (SGLang's chosen servers).
    pub fn hold(&mut self, legs: Legs) {
        self.held = self.held.with(legs);
    }

    /// True once the request's outcome is decided.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done(_))
    }

    /// How the request ended, once it has.
    pub fn end(&self) -> Option<&End> {
        match &self.state {
            State::Done(e) => Some(e),
            _ => None,
        }
    }

    /// Releases what `legs` hold (only what is held).
    fn release(&mut self, legs: Legs) -> Legs {
        let r = Legs(self.held.0 & legs.0);
        self.held = self.held.without(legs);
        r
    }

    /// Ends the flow: every counter still held is released.
    fn finish(&mut self, end: End, cancel: Legs, next: Next) -> Step {
        self.state = State::Done(end);
        let release = self.release(Legs(0xff));
        Step { cancel, release, next }
    }

    fn go(&mut self, state: State, release: Legs, next: Next) -> Step {
        self.state = state;
        let release = self.release(release);
        Step { cancel: Legs::NONE, release, next }
    }

    fn wait() -> Step {
        Step { cancel: Legs::NONE, release: Legs::NONE, next: Next::Wait }
    }

    fn ignore() -> Step {
        Step { cancel: Legs::NONE, release: Legs::NONE, next: Next::Ignore }
    }

    /// The step after the encoder stage (or without one).
    fn legs(&mut self) -> Step {
        match self.spec.shape {
            Shape::DecodeOnly => self.go(State::Decoding, Legs::NONE, Next::Decode),
            Shape::Sequential => {
                self.go(State::Prefilling { attempt: 0 }, Legs::NONE, Next::StartPrefill)
            }
            Shape::Together => self.go(
                State::Together { prefill: Side::Running, decode: Side::Running },
                Legs::NONE,
                Next::StartTogether,
            ),
        }
    }

    /// Feeds one event in.
    pub fn on(&mut self, event: Event) -> Step {
        use Event as E;
        match (&mut self.state, event) {
            (State::Done(_), _) => Self::ignore(),

            // The client left: stop whatever runs, release everything.
            (State::ReadingBody | State::Decoding, E::ClientGone) => {
                self.finish(End::ClientGone, Legs::NONE, Next::Ignore)
            }
            (State::Encoding(_), E::ClientGone) => {
                self.finish(End::ClientGone, Legs::ENCODERS, Next::Ignore)
            }
            (State::Retrying { .. }, E::ClientGone) => {
                self.finish(End::ClientGone, Legs::NONE, Next::Ignore)
            }
            (State::Prefilling { .. }, E::ClientGone) => {
                self.finish(End::ClientGone, Legs::PREFILL, Next::Ignore)
            }
            (State::Together { prefill, .. }, E::ClientGone) => {
                let cancel = if *prefill == Side::Running { Legs::PREFILL } else { Legs::NONE };
                self.finish(End::ClientGone, cancel.with(Legs::DECODE), Next::Ignore)
            }

            (State::ReadingBody, E::Refused { status }) => {
                self.finish(End::Refused { status }, Legs::NONE, Next::Refuse { status })
            }
            (State::ReadingBody, E::BodyReady { media }) => {
                if self.spec.encode && media > 0 {
                    self.go(State::Encoding(FanOut::new(media)), Legs::NONE, Next::StartEncoders)
                } else {
                    self.legs()
                }
            }

            (State::Encoding(fan), E::EncoderEnded { index, outcome }) => {
                match fan.record(index, &outcome) {
                    Decision::Wait | Decision::Ignore if outcome == EncodeOutcome::ClientGone => {
                        self.finish(End::ClientGone, Legs::ENCODERS, Next::Ignore)
                    }
                    Decision::Wait | Decision::Ignore => Self::wait(),
                    Decision::Proceed => self.legs(),
                    Decision::Fail { index, failure } => {
                        let f = Failure::Encoder { index, failure };
                        self.finish(End::Failed(f.clone()), Legs::ENCODERS, Next::Fail(f))
                    }
                }
            }
            // Starting a stage failed: nothing reached the client yet.
            (State::Encoding(_), E::StartFailed) => self.finish(
                End::Failed(Failure::Internal),
                Legs::ENCODERS,
                Next::Fail(Failure::Internal),
            ),
            (
                State::Prefilling { .. }
                | State::Retrying { .. }
                | State::Decoding
                | State::ReadingBody,
                E::StartFailed,
            ) => self.finish(
                End::Failed(Failure::Internal),
                Legs::NONE,
                Next::Fail(Failure::Internal),
            ),
            // (Reported right after `Next::StartTogether`: the prefill did
            // not start and the decode has not run.)
            (State::Together { prefill, decode }, E::StartFailed) => {
                if *decode == Side::Ok {
                    let cancel = if *prefill == Side::Running { Legs::PREFILL } else { Legs::NONE };
                    self.finish(End::Failed(Failure::Internal), cancel, Next::Terminate)
                } else {
                    self.finish(
                        End::Failed(Failure::Internal),
                        Legs::NONE,
                        Next::Fail(Failure::Internal),
                    )
                }
            }

            (State::Prefilling { attempt }, E::PrefillEnded(PrefillOutcome::Fail(f)))
                if f.is_retryable() && *attempt < self.spec.retries =>
            {
                let attempt = *attempt;
                self.go(State::Retrying { failure: f, attempt }, Legs::PREFILL, Next::RetryPrefill)
            }
            (State::Retrying { failure, attempt }, E::Retry { ready }) => {
                if ready {
                    let attempt = *attempt + 1;
                    self.go(State::Prefilling { attempt }, Legs::NONE, Next::StartPrefill)
                } else if self.spec.fallback {
                    self.go(State::Decoding, Legs::PREFILL, Next::DecodeAlone)
                } else {
                    let f = Failure::Prefill(*failure);
                    self.finish(End::Failed(f.clone()), Legs::NONE, Next::Fail(f))
                }
            }
            (State::Prefilling { .. }, E::PrefillEnded(outcome)) => match outcome {
                PrefillOutcome::Decode => self.go(State::Decoding, Legs::PREFILL, Next::Decode),
                PrefillOutcome::PassThrough { status } if self.spec.fallback && status >= 500 => {
                    self.go(State::Decoding, Legs::PREFILL, Next::DecodeAlone)
                }
                PrefillOutcome::PassThrough { status } => self.finish(
                    End::PassedThrough { status },
                    Legs::NONE,
                    Next::PassThrough { status },
                ),
                PrefillOutcome::Fail(f) if self.spec.fallback && f.may_fall_back() => {
                    self.go(State::Decoding, Legs::PREFILL, Next::DecodeAlone)
                }
                PrefillOutcome::Fail(f) => {
                    let f = Failure::Prefill(f);
                    self.finish(End::Failed(f.clone()), Legs::NONE, Next::Fail(f))
                }
                PrefillOutcome::ClientGone => {
                    self.finish(End::ClientGone, Legs::NONE, Next::Ignore)
                }
            },

            (State::Together { prefill, decode }, E::PrefillEnded(outcome)) => {
                if *prefill != Side::Running {
                    return Self::ignore();
                }
                let decode = *decode;
                let failure = match outcome {
                    PrefillOutcome::Decode => {
                        self.state = State::Together { prefill: Side::Ok, decode };
                        let release = self.release(Legs::PREFILL);
                        return Step { cancel: Legs::NONE, release, next: Next::Wait };
                    }
                    PrefillOutcome::ClientGone => {
                        return self.finish(End::ClientGone, Legs::DECODE, Next::Ignore)
                    }
                    PrefillOutcome::PassThrough { status } => Failure::PrefillStatus(status),
                    PrefillOutcome::Fail(f) => Failure::Prefill(f),
                };
                if decode == Side::Ok {
                    // The client has the decode's header: nothing clean
                    // can be said any more.
                    self.finish(End::Failed(failure), Legs::DECODE, Next::Terminate)
                } else {
                    self.finish(End::Failed(failure.clone()), Legs::DECODE, Next::Fail(failure))
                }
            }
            (State::Together { prefill, decode }, E::DecodeHeader { status }) => {
                if *decode == Side::Ok {
                    return Self::ignore();
                }
                *decode = Side::Ok;
                if status >= 400 && *prefill == Side::Running {
                    // The decode failed: the prefill is of no use now.
                    *prefill = Side::Ok;
                    let release = self.release(Legs::PREFILL);
                    return Step { cancel: Legs::PREFILL, release, next: Next::Wait };
                }
                Self::wait()
            }
            (State::Together { prefill, .. }, E::DecodeEnded) => {
                if *prefill == Side::Running {
                    self.go(State::Lingering, Legs::DECODE, Next::Linger)
                } else {
                    self.finish(End::Decoded, Legs::NONE, Next::Ignore)
                }
            }
            // Whatever the prefill does now cannot change the answer.
            (State::Lingering, E::PrefillEnded(_)) => {
                self.finish(End::Decoded, Legs::NONE, Next::Ignore)
            }
            (State::Lingering, E::GraceExpired) => {
                self.finish(End::Decoded, Legs::PREFILL, Next::Ignore)
            }
            (State::Lingering, E::ClientGone) => {
                self.finish(End::ClientGone, Legs::PREFILL, Next::Ignore)
            }
            (
                State::Lingering,
                E::BodyReady { .. }
                | E::Refused { .. }
                | E::EncoderEnded { .. }
                | E::DecodeHeader { .. }
                | E::DecodeEnded
                | E::StartFailed,
            ) => Self::ignore(),
            (
                State::ReadingBody
                | State::Encoding(_)
                | State::Prefilling { .. }
                | State::Retrying { .. }
                | State::Together { .. }
                | State::Decoding,
                E::GraceExpired,
            ) => Self::ignore(),
            (
                State::ReadingBody
                | State::Encoding(_)
                | State::Prefilling { .. }
                | State::Together { .. }
                | State::Lingering
                | State::Decoding,
                E::Retry { .. },
            ) => Self::ignore(),
            (State::Decoding, E::DecodeEnded) => {
                self.finish(End::Decoded, Legs::NONE, Next::Ignore)
            }

            // Events that cannot happen in a state (a late or repeated
            // callback): nothing to do.
            (
                State::ReadingBody,
                E::EncoderEnded { .. }
                | E::PrefillEnded(_)
                | E::DecodeHeader { .. }
                | E::DecodeEnded,
            )
            | (
                State::Encoding(_),
                E::BodyReady { .. }
                | E::Refused { .. }
                | E::PrefillEnded(_)
                | E::DecodeHeader { .. }
                | E::DecodeEnded,
            )
            | (
                State::Prefilling { .. },
                E::BodyReady { .. }
                | E::Refused { .. }
                | E::EncoderEnded { .. }
                | E::DecodeHeader { .. }
                | E::DecodeEnded,
            )
            | (
                State::Retrying { .. },
                E::BodyReady { .. }
                | E::Refused { .. }
                | E::EncoderEnded { .. }
                | E::PrefillEnded(_)
                | E::DecodeHeader { .. }
                | E::DecodeEnded,
            )
            | (
                State::Together { .. },
                E::BodyReady { .. } | E::Refused { .. } | E::EncoderEnded { .. },
            )
            | (
                State::Decoding,
                E::BodyReady { .. }
                | E::Refused { .. }
                | E::EncoderEnded { .. }
                | E::PrefillEnded(_)
                | E::DecodeHeader { .. },
            ) => Self::ignore(),
        }
    }
}

#[cfg(test)]
#[path = "flow_tests.rs"]
mod tests;
