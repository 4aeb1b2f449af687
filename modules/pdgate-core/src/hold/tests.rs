//! The gate's unit tests.

use super::*;

const CAPS: Caps = Caps { prefill: 2, decode: 3, queue: 4, order: Order::Fifo };

fn gate() -> Box<Gate> {
    Box::default()
}

#[test]
fn zone_gates_by_key() {
    let t = std::thread::Builder::new().stack_size(64 << 20).spawn(|| {
        let z = Box::new(HoldZone {
            magic: AtomicU64::new(0),
            gates: std::array::from_fn(|_| Gate::default()),
        });
        assert!(z.attach() && z.is_attached());
        let a = z.gate(5).unwrap() as *const Gate;
        assert_eq!(z.gate(5).unwrap() as *const Gate, a, "found again");
        for k in 100..100 + GATES as u64 - 1 {
            assert!(z.gate(k).is_some());
        }
        assert!(z.gate(999).is_none(), "every gate taken");
        assert_eq!(z.gates().count(), GATES);
    });
    t.unwrap().join().unwrap();
}

#[test]
fn names_and_metrics_text() {
    let g = gate();
    g.set_name(b"server 127.0.0.1:8080 location /v1/");
    assert_eq!(g.name(), b"server 127.0.0.1:8080 location /v1/");
    g.set_name(&[b'x'; 80]);
    assert_eq!(g.name().len(), 64, "cut at 64 bytes");
    g.admit(&CAPS, 7, 1, 0);
    g.admit(&CAPS, 7, 1, 0);
    let Admission::Queued(seq) = g.admit(&CAPS, 7, 1, 0) else { panic!() };
    g.give_back(Room { prefill: 1, decode: 1 }, 7);
    g.pump(&CAPS, 7);
    assert_eq!(g.woke(seq, 9), 2, "released at 7, resumed at 9");
    let mut o = String::new();
    render(&mut o, &[(b"/v1/".to_vec(), g.stats())]);
    assert!(o.contains("pdgate_hold_waiting{location=\"/v1/\"} 0\n"));
    assert!(o.contains("pdgate_hold_admitted_total{location=\"/v1/\"} 2\n"));
    assert!(o.contains("pdgate_hold_released_total{location=\"/v1/\"} 1\n"));
    assert!(o.contains("pdgate_hold_wait_seconds_bucket{location=\"/v1/\",le=\"0.005\"} 0\n"));
    assert!(o.contains("pdgate_hold_wait_seconds_bucket{location=\"/v1/\",le=\"0.010\"} 1\n"));
    assert!(o.contains("pdgate_hold_wait_seconds_sum{location=\"/v1/\"} 0.007\n"));
    assert!(o.contains("pdgate_hold_wake_delay_seconds_sum{location=\"/v1/\"} 0.002\npdgate_hold_wake_delay_seconds_count{location=\"/v1/\"} 1\n"));
    let mut none = String::new();
    render(&mut none, &[]);
    assert!(none.is_empty());
}

#[test]
fn admits_until_a_pool_is_full_then_queues_then_refuses() {
    let g = gate();
    assert_eq!(g.admit(&CAPS, 7, 1, 0), Admission::Now);
    assert_eq!(g.admit(&CAPS, 7, 1, 0), Admission::Now);
    // The prefill pool (2) is full.
    assert_eq!(g.admit(&CAPS, 7, 1, 10), Admission::Queued(0));
    assert_eq!(g.admit(&CAPS, 8, 1, 10), Admission::Queued(1));
    assert_eq!(g.admit(&CAPS, 8, 1, 10), Admission::Queued(2));
    assert_eq!(g.admit(&CAPS, 8, 1, 10), Admission::Queued(3));
    assert_eq!(g.admit(&CAPS, 8, 1, 10), Admission::Full);
    let s = g.stats();
    assert_eq!((s.prefill, s.decode, s.waiting, s.admitted, s.full), (2, 2, 4, 2, 1));
}

#[test]
fn fifo_release_when_room_frees_and_decode_room_is_reserved_first() {
    let g = gate();
    g.admit(&CAPS, 7, 1, 0);
    g.admit(&CAPS, 7, 1, 0);
    let Admission::Queued(a) = g.admit(&CAPS, 7, 1, 100) else { panic!() };
    let Admission::Queued(b) = g.admit(&CAPS, 7, 1, 100) else { panic!() };
    // A prefill ends: one prefill slot frees, the decode (3) has room.
    g.give_back(Room { prefill: 1, decode: 0 }, 7);
    assert_eq!(g.pump(&CAPS, 150), 1);
    assert_eq!((g.poll(a), g.poll(b)), (TicketState::Released, TicketState::Waiting));
    // Another prefill ends, but the decode pool is now full (3): b waits.
    g.give_back(Room { prefill: 1, decode: 0 }, 7);
    assert_eq!(g.pump(&CAPS, 160), 0);
    assert_eq!(g.poll(b), TicketState::Waiting);
    // A request ends: its decode slot frees, b goes.
    g.give_back(Room { prefill: 0, decode: 1 }, 7);
    assert_eq!(g.pump(&CAPS, 200), 1);
    assert_eq!(g.poll(b), TicketState::Released);
    let s = g.stats();
    assert_eq!((s.released, s.waiting, s.prefill, s.decode), (2, 0, 2, 3));
    assert_eq!(s.wait_sum_ms, 50 + 100);
    assert_eq!(s.waits[4], 2, "both within 100 ms");
    assert_eq!(s.waits[3], 1, "one within 50 ms");
    // New arrivals queue behind nothing now but still find no room.
    assert!(matches!(g.admit(&CAPS, 7, 1, 200), Admission::Queued(_)));
}

#[test]
fn shortest_prompt_first_with_aging() {
    let caps = Caps { prefill: 1, decode: 1, queue: 8, order: Order::Spf { aging_tps: 1000 } };
    let g = gate();
    assert_eq!(g.admit(&caps, 7, 10, 0), Admission::Now);
    let Admission::Queued(long) = g.admit(&caps, 7, 5000, 0) else { panic!() };
    let Admission::Queued(short) = g.admit(&caps, 7, 100, 1000) else { panic!() };
    let Admission::Queued(mid) = g.admit(&caps, 7, 400, 1000) else { panic!() };
    // At 1 s: long counts 5000 − 1000, short 100, mid 400.
    g.give_back(Room { prefill: 1, decode: 1 }, 7);
    assert_eq!(g.pump(&caps, 1000), 1);
    assert_eq!(g.poll(short), TicketState::Released, "the shortest first");
    g.give_back(Room { prefill: 1, decode: 1 }, 7);
    assert_eq!(g.pump(&caps, 1000), 1);
    assert_eq!(g.poll(mid), TicketState::Released);
    // Fresh short prompts keep coming, but the long one has aged: at
    // 5 s it counts 0, below a fresh 300-token one.
    let Admission::Queued(fresh) = g.admit(&caps, 7, 300, 5000) else { panic!() };
    g.give_back(Room { prefill: 1, decode: 1 }, 7);
    assert_eq!(g.pump(&caps, 5000), 1);
    assert_eq!((g.poll(long), g.poll(fresh)), (TicketState::Released, TicketState::Waiting));
    // The head moved past everything resolved at its front.
    g.give_back(Room { prefill: 1, decode: 1 }, 7);
    assert_eq!(g.pump(&caps, 5000), 1);
    assert_eq!(g.stats().waiting, 0);
    assert_eq!(g.admit(&caps, 7, 1, 5000), Admission::Queued(fresh + 1), "the room is taken");
}

#[test]
fn a_cancelled_ticket_is_skipped_and_a_late_cancel_loses() {
    let g = gate();
    g.admit(&CAPS, 7, 1, 0);
    g.admit(&CAPS, 7, 1, 0);
    let Admission::Queued(a) = g.admit(&CAPS, 7, 1, 0) else { panic!() };
    let Admission::Queued(b) = g.admit(&CAPS, 7, 1, 0) else { panic!() };
    assert!(g.cancel(a, true), "timed out while waiting");
    assert_eq!(g.poll(a), TicketState::Gone);
    g.give_back(Room { prefill: 1, decode: 1 }, 7);
    assert_eq!(g.pump(&CAPS, 0), 1);
    assert_eq!(g.poll(b), TicketState::Released, "b, not the cancelled a");
    assert!(!g.cancel(b, false), "released first: the room is the holder's");
    let s = g.stats();
    assert_eq!((s.timed_out, s.left, s.prefill, s.decode), (1, 0, 2, 2));
}

#[test]
fn queued_while_room_exists_is_released_at_once() {
    let g = gate();
    // Something waits (a ticket whose pump has not run), so a new
    // arrival queues even with room; its own pump releases both.
    let caps = Caps { prefill: 1, decode: 1, queue: 8, order: Order::Fifo };
    g.admit(&caps, 7, 1, 0);
    let Admission::Queued(a) = g.admit(&caps, 7, 1, 0) else { panic!() };
    g.give_back(Room { prefill: 1, decode: 1 }, 7);
    let big = Caps { prefill: 5, decode: 5, queue: 8, order: Order::Fifo };
    let Admission::Queued(b) = g.admit(&big, 7, 1, 0) else { panic!() };
    assert_eq!((g.poll(a), g.poll(b)), (TicketState::Released, TicketState::Released));
}

#[test]
fn a_dead_process_gives_back_its_room_and_its_tickets() {
    let g = gate();
    g.admit(&CAPS, 7, 1, 0);
    g.admit(&CAPS, 9, 1, 0);
    let Admission::Queued(mine) = g.admit(&CAPS, 9, 1, 0) else { panic!() };
    let Admission::Queued(other) = g.admit(&CAPS, 7, 1, 0) else { panic!() };
    let got = g.reclaim(9);
    assert_eq!(got, Room { prefill: 1, decode: 1 });
    assert_eq!(g.poll(mine), TicketState::Gone);
    assert_eq!(g.pump(&CAPS, 0), 1);
    assert_eq!(g.poll(other), TicketState::Released);
    assert_eq!(g.owners(), vec![7]);
    let s = g.stats();
    assert_eq!((s.prefill, s.decode), (2, 2));
}

#[test]
fn ring_slots_are_reused_without_confusing_tickets() {
    let g = gate();
    let caps = Caps { prefill: 1, decode: 1, queue: QUEUE_MAX as u64, order: Order::Fifo };
    g.admit(&caps, 7, 1, 0);
    for round in 0..3u64 {
        for k in 0..QUEUE_MAX as u64 {
            let seq = round * QUEUE_MAX as u64 + k;
            assert_eq!(g.admit(&caps, 7, 1, 0), Admission::Queued(seq));
        }
        assert_eq!(g.admit(&caps, 7, 1, 0), Admission::Full);
        // The first half times out; the rest are served one by one.
        for k in 0..QUEUE_MAX as u64 / 2 {
            assert!(g.cancel(round * QUEUE_MAX as u64 + k, true));
        }
        for k in QUEUE_MAX as u64 / 2..QUEUE_MAX as u64 {
            g.give_back(Room { prefill: 1, decode: 1 }, 7);
            assert_eq!(g.pump(&caps, 0), 1);
            assert_eq!(g.poll(round * QUEUE_MAX as u64 + k), TicketState::Released);
        }
        // An old ticket's late cancel does not touch the slot's new one.
        assert!(!g.cancel(round * QUEUE_MAX as u64, false));
    }
}

#[test]
fn concurrent_admissions_never_exceed_the_caps() {
    use std::sync::Arc;
    let g: Arc<Gate> = Arc::from(gate());
    let caps = Caps { prefill: 5, decode: 7, queue: 1000, order: Order::Spf { aging_tps: 100 } };
    let threads: Vec<_> = (1..=4u64)
        .map(|owner| {
            let g = g.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..2000u64 {
                    match g.admit(&caps, owner, i % 300, i) {
                        Admission::Now => mine.push(None),
                        Admission::Queued(s) => mine.push(Some(s)),
                        Admission::Full => {}
                    }
                    let s = g.stats();
                    assert!(s.prefill <= caps.prefill && s.decode <= caps.decode);
                    // Finish the oldest admitted request of this thread.
                    if let Some(pos) = mine.iter().position(|t| match t {
                        None => true,
                        Some(s) => g.poll(*s) == TicketState::Released,
                    }) {
                        mine.remove(pos);
                        g.give_back(Room { prefill: 1, decode: 1 }, owner);
                        g.pump(&caps, i);
                    }
                }
                for t in mine {
                    match t {
                        Some(s) if g.cancel(s, false) => {}
                        _ => g.give_back(Room { prefill: 1, decode: 1 }, owner),
                    }
                }
                g.pump(&caps, 0);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Every reservation was given back, every ticket resolved.
    let s = g.stats();
    assert_eq!((s.prefill, s.decode, s.waiting), (0, 0, 0), "{s:?}");
    assert_eq!(s.admitted + s.released, s.admitted + s.queued - s.left);
}
