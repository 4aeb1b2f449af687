//! Tests of the P/D flow: every event in every reachable state, then
//! one test per path.
use super::*;

const SEQ: Spec = Spec { encode: false, shape: Shape::Sequential, retries: 0, fallback: false };
const SEQ_RETRY: Spec =
    Spec { encode: false, shape: Shape::Sequential, retries: 2, fallback: false };
const TOG: Spec = Spec { encode: false, shape: Shape::Together, retries: 0, fallback: false };
const EPD: Spec = Spec { encode: true, shape: Shape::Sequential, retries: 0, fallback: false };
const SEQ_FALLBACK: Spec = Spec { fallback: true, ..SEQ };
const ENC_ONLY: Spec = Spec { encode: true, shape: Shape::DecodeOnly, retries: 0, fallback: false };

fn all_specs() -> Vec<Spec> {
    let mut v = Vec::new();
    for encode in [false, true] {
        for shape in [Shape::DecodeOnly, Shape::Sequential, Shape::Together] {
            for retries in [0, 1, 2] {
                for fallback in [false, true] {
                    v.push(Spec { encode, shape, retries, fallback });
                }
            }
        }
    }
    v
}

/// Every kind of event, with each prefill and encoder ending.
fn all_events() -> Vec<Event> {
    let mut v = vec![
        Event::BodyReady { media: 0 },
        Event::BodyReady { media: 2 },
        Event::Refused { status: 400 },
        Event::Refused { status: 503 },
        Event::DecodeHeader { status: 200 },
        Event::DecodeHeader { status: 502 },
        Event::DecodeEnded,
        Event::StartFailed,
        Event::GraceExpired,
        Event::Retry { ready: true },
        Event::Retry { ready: false },
        Event::ClientGone,
    ];
    for o in [
        PrefillOutcome::Decode,
        PrefillOutcome::PassThrough { status: 400 },
        PrefillOutcome::PassThrough { status: 503 },
        PrefillOutcome::Fail(PrefillFailure::CutOff),
        PrefillOutcome::Fail(PrefillFailure::BufferTooSmall),
        PrefillOutcome::Fail(PrefillFailure::Timeout),
        PrefillOutcome::Fail(PrefillFailure::Unreachable),
        PrefillOutcome::Fail(PrefillFailure::Status(404)),
        PrefillOutcome::Fail(PrefillFailure::Internal),
        PrefillOutcome::ClientGone,
    ] {
        v.push(Event::PrefillEnded(o));
    }
    for index in [0, 1, 5] {
        for outcome in [
            EncodeOutcome::Ok,
            EncodeOutcome::Failed(EncodeFailure::Timeout),
            EncodeOutcome::Failed(EncodeFailure::Status { status: 500, detail: None }),
            EncodeOutcome::ClientGone,
        ] {
            v.push(Event::EncoderEnded { index, outcome });
        }
    }
    v
}

/// The flows reachable from the start by up to `depth` events, with
/// the legs a driver would hold counters for (SGLang: both legs from
/// the moment they start).
fn reachable(spec: Spec, depth: usize) -> Vec<Flow> {
    let mut seen = vec![Flow::new(spec)];
    let mut frontier = seen.clone();
    for _ in 0..depth {
        let mut next = Vec::new();
        for f in &frontier {
            for e in all_events() {
                let mut g = f.clone();
                let step = g.on(e);
                if matches!(step.next, Next::StartPrefill) {
                    g.hold(Legs::PREFILL);
                }
                if matches!(step.next, Next::StartTogether) {
                    g.hold(Legs::PREFILL.with(Legs::DECODE));
                }
                if matches!(step.next, Next::Decode) {
                    g.hold(Legs::DECODE);
                }
                if !seen.contains(&g) {
                    seen.push(g.clone());
                    next.push(g);
                }
            }
        }
        frontier = next;
    }
    seen
}

#[test]
fn every_event_in_every_state_keeps_the_invariants() {
    let mut checked = 0;
    for spec in all_specs() {
        for flow in reachable(spec, 5) {
            for e in all_events() {
                let mut f = flow.clone();
                let held = f.held();
                let step = f.on(e.clone());
                checked += 1;
                let ctx = format!("{:?} + {:?} -> {:?}", flow.state(), e, step);
                // Released legs were held, and are held no more.
                assert_eq!(Legs(step.release.0 & !held.0), Legs::NONE, "{ctx}");
                assert_eq!(Legs(f.held().0 & step.release.0), Legs::NONE, "{ctx}");
                // A finished request holds nothing.
                if f.is_done() {
                    assert!(f.held().is_empty(), "{ctx}");
                }
                // A done request ignores everything.
                if flow.is_done() {
                    assert_eq!(step, Flow::ignore(), "{ctx}");
                    assert_eq!(f, flow, "{ctx}");
                }
                // Answering the client ourselves only before the decode
                // sent anything (a failed start of the decode is reported
                // right after `Next::Decode`, before `proxy_pass` runs).
                if matches!(
                    step.next,
                    Next::Fail(_) | Next::PassThrough { .. } | Next::Refuse { .. }
                ) {
                    assert!(
                        !matches!(flow.state(), State::Together { decode: Side::Ok, .. }),
                        "{ctx}"
                    );
                    assert!(e == Event::StartFailed || *flow.state() != State::Decoding, "{ctx}");
                    assert!(f.is_done(), "{ctx}");
                }
                // Terminate only once the decode's header went out.
                if step.next == Next::Terminate {
                    assert!(
                        matches!(flow.state(), State::Together { decode: Side::Ok, .. }),
                        "{ctx}"
                    );
                }
                // Never cancel a leg that is not running.
                if step.cancel.contains(Legs::ENCODERS) {
                    assert!(matches!(flow.state(), State::Encoding(_)), "{ctx}");
                }
                if step.cancel.contains(Legs::PREFILL) {
                    assert!(
                        matches!(
                            flow.state(),
                            State::Prefilling { .. }
                                | State::Lingering
                                | State::Together { prefill: Side::Running, .. }
                        ),
                        "{ctx}"
                    );
                }
                // Retries only where the spec allows them, bounded.
                if step.next == Next::RetryPrefill {
                    assert!(
                        matches!(flow.state(), State::Prefilling { attempt } if *attempt < spec.retries),
                        "{ctx}"
                    );
                }
                if let State::Prefilling { attempt } = f.state() {
                    assert!(*attempt <= spec.retries, "{ctx}");
                }
                // Only the spec's stages start.
                match step.next {
                    Next::StartEncoders => assert!(spec.encode, "{ctx}"),
                    Next::StartPrefill => assert_eq!(spec.shape, Shape::Sequential, "{ctx}"),
                    Next::StartTogether => assert_eq!(spec.shape, Shape::Together, "{ctx}"),
                    _ => {}
                }
            }
        }
    }
    assert!(checked > 2000, "{checked}");
}

/// Runs `events` from the start, holding what a driver would hold;
/// returns the steps.
fn run(spec: Spec, events: &[Event]) -> (Flow, Vec<Step>) {
    let mut f = Flow::new(spec);
    let mut steps = Vec::new();
    for e in events {
        let s = f.on(e.clone());
        match s.next {
            Next::StartPrefill => f.hold(Legs::PREFILL),
            Next::StartTogether => f.hold(Legs::PREFILL.with(Legs::DECODE)),
            _ => {}
        }
        steps.push(s);
    }
    (f, steps)
}

fn nexts(steps: &[Step]) -> Vec<Next> {
    steps.iter().map(|s| s.next.clone()).collect()
}

#[test]
fn sequential_happy_path_releases_the_prefill_when_it_ends() {
    let (f, steps) = run(
        SEQ,
        &[
            Event::BodyReady { media: 3 },
            Event::PrefillEnded(PrefillOutcome::Decode),
            Event::DecodeEnded,
        ],
    );
    assert_eq!(nexts(&steps), [Next::StartPrefill, Next::Decode, Next::Ignore]);
    assert_eq!(steps[1].release, Legs::PREFILL);
    assert_eq!(f.end(), Some(&End::Decoded));
}

#[test]
fn sequential_prefill_errors_answer_the_client() {
    for (outcome, next) in [
        (PrefillOutcome::PassThrough { status: 400 }, Next::PassThrough { status: 400 }),
        (
            PrefillOutcome::Fail(PrefillFailure::CutOff),
            Next::Fail(Failure::Prefill(PrefillFailure::CutOff)),
        ),
        (
            PrefillOutcome::Fail(PrefillFailure::BufferTooSmall),
            Next::Fail(Failure::Prefill(PrefillFailure::BufferTooSmall)),
        ),
        (PrefillOutcome::ClientGone, Next::Ignore),
    ] {
        let (f, steps) = run(SEQ, &[Event::BodyReady { media: 0 }, Event::PrefillEnded(outcome)]);
        assert_eq!(steps[1].next, next);
        assert_eq!(steps[1].release, Legs::PREFILL);
        assert!(f.is_done() && f.held().is_empty());
    }
    assert_eq!(Failure::Prefill(PrefillFailure::CutOff).http_status(), 502);
    assert_eq!(Failure::Prefill(PrefillFailure::Timeout).http_status(), 504);
}

#[test]
fn encoder_stage_waits_for_every_item_then_goes_on() {
    let ok = |index| Event::EncoderEnded { index, outcome: EncodeOutcome::Ok };
    let (_, steps) = run(EPD, &[Event::BodyReady { media: 2 }, ok(1), ok(1), ok(0)]);
    assert_eq!(nexts(&steps), [Next::StartEncoders, Next::Wait, Next::Wait, Next::StartPrefill]);
    let (_, steps) = run(ENC_ONLY, &[Event::BodyReady { media: 1 }, ok(0)]);
    assert_eq!(nexts(&steps), [Next::StartEncoders, Next::Decode]);
    // No media: no stage.
    let (_, steps) = run(EPD, &[Event::BodyReady { media: 0 }]);
    assert_eq!(nexts(&steps), [Next::StartPrefill]);
}

#[test]
fn encoder_failure_fails_once_and_cancels_the_others() {
    let failed = EncodeFailure::Status { status: 500, detail: None };
    let (f, steps) = run(
        EPD,
        &[
            Event::BodyReady { media: 3 },
            Event::EncoderEnded { index: 0, outcome: EncodeOutcome::Ok },
            Event::EncoderEnded { index: 2, outcome: EncodeOutcome::Failed(failed.clone()) },
            Event::EncoderEnded { index: 1, outcome: EncodeOutcome::Ok },
        ],
    );
    let want = Failure::Encoder { index: 2, failure: failed };
    assert_eq!(steps[2].next, Next::Fail(want.clone()));
    assert_eq!(steps[2].cancel, Legs::ENCODERS);
    assert_eq!(steps[3].next, Next::Ignore);
    assert_eq!(f.end(), Some(&End::Failed(want)));
}

#[test]
fn together_prefill_failure_cancels_the_decode_before_its_header() {
    let fail = PrefillOutcome::Fail(PrefillFailure::Unreachable);
    let (f, steps) = run(TOG, &[Event::BodyReady { media: 0 }, Event::PrefillEnded(fail)]);
    assert_eq!(steps[0].next, Next::StartTogether);
    assert_eq!(steps[1].next, Next::Fail(Failure::Prefill(PrefillFailure::Unreachable)));
    assert_eq!(steps[1].cancel, Legs::DECODE);
    assert_eq!(steps[1].release, Legs::PREFILL.with(Legs::DECODE));
    assert!(f.held().is_empty());
    // An error answer of the prefill is the client's status.
    let (_, steps) = run(
        TOG,
        &[
            Event::BodyReady { media: 0 },
            Event::PrefillEnded(PrefillOutcome::PassThrough { status: 503 }),
        ],
    );
    assert_eq!(steps[1].next, Next::Fail(Failure::PrefillStatus(503)));
    assert_eq!(Failure::PrefillStatus(503).http_status(), 503);
}

#[test]
fn together_prefill_failure_after_the_decode_header_terminates() {
    let (_, steps) = run(
        TOG,
        &[
            Event::BodyReady { media: 0 },
            Event::DecodeHeader { status: 200 },
            Event::PrefillEnded(PrefillOutcome::Fail(PrefillFailure::Timeout)),
        ],
    );
    assert_eq!(steps[2].next, Next::Terminate);
    assert_eq!(steps[2].release, Legs::PREFILL.with(Legs::DECODE));
}

#[test]
fn together_decode_failure_cancels_the_prefill() {
    let (f, steps) = run(
        TOG,
        &[
            Event::BodyReady { media: 0 },
            Event::DecodeHeader { status: 502 },
            Event::PrefillEnded(PrefillOutcome::Decode),
            Event::DecodeEnded,
        ],
    );
    assert_eq!(steps[1].cancel, Legs::PREFILL);
    assert_eq!(steps[1].release, Legs::PREFILL);
    assert_eq!(steps[2].next, Next::Ignore);
    assert_eq!(steps[3].release, Legs::DECODE);
    assert_eq!(f.end(), Some(&End::Decoded));
}

#[test]
fn together_decode_end_gives_a_running_prefill_a_grace_period_then_stops_it() {
    let start = [Event::BodyReady { media: 0 }, Event::DecodeHeader { status: 200 }];
    let (f, steps) = run(TOG, &[&start[..], &[Event::DecodeEnded, Event::GraceExpired]].concat());
    assert_eq!(steps[2].next, Next::Linger);
    assert_eq!(steps[2].release, Legs::DECODE);
    assert_eq!(steps[3].cancel, Legs::PREFILL);
    assert_eq!(steps[3].release, Legs::PREFILL);
    assert_eq!(f.end(), Some(&End::Decoded));
    // A prefill that answers in time is not stopped.
    let late =
        [Event::DecodeEnded, Event::PrefillEnded(PrefillOutcome::Decode), Event::GraceExpired];
    let (f, steps) = run(TOG, &[&start[..], &late[..]].concat());
    assert_eq!(steps[3].cancel, Legs::NONE);
    assert_eq!(steps[3].release, Legs::PREFILL);
    assert_eq!(steps[4], Flow::ignore());
    assert_eq!(f.end(), Some(&End::Decoded));
    // A prefill done first: the decode's end ends the request.
    let first = [Event::PrefillEnded(PrefillOutcome::Decode), Event::DecodeEnded];
    let (_, steps) = run(TOG, &[&start[..], &first[..]].concat());
    assert_eq!(steps[3].next, Next::Ignore);
    assert_eq!(steps[3].release, Legs::DECODE);
}

#[test]
fn client_gone_releases_everything_and_stops_running_legs() {
    let (_, steps) = run(TOG, &[Event::BodyReady { media: 0 }, Event::ClientGone]);
    assert_eq!(steps[1].cancel, Legs::PREFILL.with(Legs::DECODE));
    assert_eq!(steps[1].release, Legs::PREFILL.with(Legs::DECODE));
    let (_, steps) = run(EPD, &[Event::BodyReady { media: 2 }, Event::ClientGone]);
    assert_eq!(steps[1].cancel, Legs::ENCODERS);
    let (_, steps) = run(SEQ, &[Event::BodyReady { media: 0 }, Event::ClientGone]);
    assert_eq!(steps[1].release, Legs::PREFILL);
}

#[test]
fn refusals_answer_before_any_leg() {
    for spec in all_specs() {
        let (f, steps) = run(spec, &[Event::Refused { status: 503 }]);
        assert_eq!(steps[0].next, Next::Refuse { status: 503 });
        assert_eq!(f.end(), Some(&End::Refused { status: 503 }));
    }
}

#[test]
fn a_failed_start_is_an_internal_error() {
    let (_, steps) = run(SEQ, &[Event::BodyReady { media: 0 }, Event::StartFailed]);
    assert_eq!(steps[1].next, Next::Fail(Failure::Internal));
    assert_eq!(steps[1].release, Legs::PREFILL);
    assert_eq!(Failure::Internal.http_status(), 500);
}

#[test]
fn a_prefill_that_failed_without_an_answer_is_retried_up_to_the_limit() {
    let down = Event::PrefillEnded(PrefillOutcome::Fail(PrefillFailure::Unreachable));
    let (f, steps) = run(
        SEQ_RETRY,
        &[
            Event::BodyReady { media: 0 },
            down.clone(),
            Event::Retry { ready: true },
            down.clone(),
            Event::Retry { ready: true },
            down.clone(),
        ],
    );
    assert_eq!(
        nexts(&steps),
        [
            Next::StartPrefill,
            Next::RetryPrefill,
            Next::StartPrefill,
            Next::RetryPrefill,
            Next::StartPrefill,
            Next::Fail(Failure::Prefill(PrefillFailure::Unreachable)),
        ]
    );
    // Each failed try gives its server's counter back.
    assert_eq!(steps[1].release, Legs::PREFILL);
    assert!(f.held().is_empty());
    // An answer (even an error) is the server's word: no retry.
    let (_, steps) = run(
        SEQ_RETRY,
        &[
            Event::BodyReady { media: 0 },
            Event::PrefillEnded(PrefillOutcome::PassThrough { status: 500 }),
        ],
    );
    assert_eq!(steps[1].next, Next::PassThrough { status: 500 });
    // No other server: the first failure is the client's.
    let (_, steps) = run(
        SEQ_RETRY,
        &[
            Event::BodyReady { media: 0 },
            Event::PrefillEnded(PrefillOutcome::Fail(PrefillFailure::CutOff)),
            Event::Retry { ready: false },
        ],
    );
    assert_eq!(steps[2].next, Next::Fail(Failure::Prefill(PrefillFailure::CutOff)));
    // A retry that succeeds goes on to the decode.
    let (f, steps) = run(
        SEQ_RETRY,
        &[
            Event::BodyReady { media: 0 },
            Event::PrefillEnded(PrefillOutcome::Fail(PrefillFailure::Timeout)),
            Event::Retry { ready: true },
            Event::PrefillEnded(PrefillOutcome::Decode),
        ],
    );
    assert_eq!(steps[3].next, Next::Decode);
    assert_eq!(f.state(), &State::Decoding);
}

#[test]
fn fallback_sends_the_decode_alone_after_a_failed_prefill() {
    use crate::pd::PrefillFailure::*;
    // No prefill server answered, or one answered 5xx: the decode alone.
    for outcome in [
        PrefillOutcome::Fail(Unreachable),
        PrefillOutcome::Fail(Timeout),
        PrefillOutcome::Fail(CutOff),
        PrefillOutcome::Fail(Status(503)),
        PrefillOutcome::PassThrough { status: 500 },
    ] {
        let mut f = Flow::new(SEQ_FALLBACK);
        assert_eq!(f.on(Event::BodyReady { media: 0 }).next, Next::StartPrefill);
        f.hold(Legs::PREFILL);
        let s = f.on(Event::PrefillEnded(outcome));
        assert_eq!(s.next, Next::DecodeAlone, "{outcome:?}");
        assert_eq!(s.release, Legs::PREFILL, "{outcome:?}");
        assert_eq!(f.state(), &State::Decoding);
    }
    // Not for the client's own errors, nor ours.
    for (outcome, next) in [
        (PrefillOutcome::PassThrough { status: 400 }, Next::PassThrough { status: 400 }),
        (PrefillOutcome::Fail(BufferTooSmall), Next::Fail(Failure::Prefill(BufferTooSmall))),
        (PrefillOutcome::Fail(Internal), Next::Fail(Failure::Prefill(Internal))),
    ] {
        let mut f = Flow::new(SEQ_FALLBACK);
        f.on(Event::BodyReady { media: 0 });
        assert_eq!(f.on(Event::PrefillEnded(outcome)).next, next, "{outcome:?}");
    }
    // Without it, the same failure is an error.
    let mut f = Flow::new(SEQ);
    f.on(Event::BodyReady { media: 0 });
    let s = f.on(Event::PrefillEnded(PrefillOutcome::Fail(Unreachable)));
    assert_eq!(s.next, Next::Fail(Failure::Prefill(Unreachable)));
}

#[test]
fn fallback_comes_after_the_retries() {
    let spec = Spec { fallback: true, ..SEQ_RETRY };
    let mut f = Flow::new(spec);
    f.on(Event::BodyReady { media: 0 });
    let unreachable = PrefillOutcome::Fail(crate::pd::PrefillFailure::Unreachable);
    assert_eq!(f.on(Event::PrefillEnded(unreachable)).next, Next::RetryPrefill);
    assert_eq!(f.on(Event::Retry { ready: true }).next, Next::StartPrefill);
    assert_eq!(f.on(Event::PrefillEnded(unreachable)).next, Next::RetryPrefill);
    // No other server to try: the decode alone.
    assert_eq!(f.on(Event::Retry { ready: false }).next, Next::DecodeAlone);
    assert_eq!(f.state(), &State::Decoding);
}
