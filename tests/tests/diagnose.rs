//! `socktrace diagnose`: one scenario per verdict code, each in its own network namespace, driven
//! by real traffic, with the tracer ready before the traffic starts (the lab order; `field.rs`
//! runs the same scenarios with the tracer attached to traffic already running). The verdict must
//! be right and the evidence numbers must match what the scenario did (the namespace's own
//! counters, the server's accept count). The scenarios are in `verdicts/`.

mod verdicts;

use socktrace_tests::privileged;
use verdicts::Order::TracerFirst;

#[test]
fn healthy() {
    if privileged() {
        verdicts::healthy(TracerFirst, 9500);
    }
}

#[test]
fn accept_stall() {
    if privileged() {
        verdicts::accept_stall(TracerFirst, 9501);
    }
}

#[test]
fn backlog_too_small() {
    if privileged() {
        verdicts::backlog_too_small(TracerFirst, 9502);
    }
}

#[test]
fn somaxconn_cap() {
    if privileged() {
        verdicts::somaxconn_cap(TracerFirst, 9503);
    }
}

#[test]
fn syn_flood() {
    if privileged() {
        verdicts::syn_flood(TracerFirst, 9504);
    }
}

#[test]
fn packet_loss() {
    if privileged() {
        verdicts::packet_loss(TracerFirst, 9505);
    }
}

#[test]
fn no_listener() {
    if privileged() {
        verdicts::no_listener(TracerFirst, 9506);
    }
}

#[test]
fn no_listener_from_a_filter_expression() {
    if privileged() {
        verdicts::no_listener_scoped(TracerFirst, 9517, true);
    }
}
