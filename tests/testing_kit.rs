#![allow(missing_docs)] // the example's items, included as a module
//! The test kit (`flowwire::testing`), on the approval example with its real two-day waits:
//! an engine on memory storage whose clock the test moves, and a scripted `Notify` driver.
//! A timer fires when the clock passes it, not before; a retry's backoff comes due the same
//! way; the script records every call.

use std::time::Duration;

use flowwire::prelude::*;
use flowwire::testing::{self, Script};

#[allow(dead_code)] // the example's `main` and its driver are not used here
#[path = "../examples/approval.rs"]
mod approval;

use approval::{ANSWER_WITHIN, Approval, ApprovalImpulse, Decision, NotifyCall, NotifyError};
use approval::{NotifyProxy, request};

/// A successful reply of any `Notify` method.
const OK: Result<(), NotifyError> = Ok(());

/// Waits (bounded, on real time) until `check` holds on the request's state.
async fn until(h: &approval::ApprovalHandle, check: impl Fn(&approval::ExpenseState) -> bool) {
    for _ in 0..2_000 {
        if check(&h.state().await.unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("the request never got there: {:?}", h.state().await);
}

fn names(calls: &[NotifyCall]) -> Vec<&'static str> {
    calls
        .iter()
        .map(|c| match c {
            NotifyCall::Ask { .. } => "ask",
            NotifyCall::Remind { .. } => "remind",
            NotifyCall::Tell { .. } => "tell",
        })
        .collect()
}

#[tokio::test]
async fn an_unanswered_request_is_reminded_after_two_days_and_expires_after_four() {
    let (builder, clock) = testing::engine();
    let notify = Script::<NotifyProxy>::new();
    notify
        .reply("ask", OK)
        .reply("remind", OK)
        .reply("tell", OK);
    let engine = builder
        .flow::<Approval>()
        .script(notify.clone())
        .start()
        .await
        .unwrap();
    let h = engine
        .start::<Approval>("r-1", request("EXP-9", "ana", 4_000))
        .await
        .unwrap();
    until(&h, |s| s.asked).await;

    clock.advance(ANSWER_WITHIN.saturating_sub(Duration::from_secs(1)));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        names(&notify.calls()),
        ["ask"],
        "a second early, nothing fires"
    );

    clock.advance(Duration::from_secs(1));
    until(&h, |s| s.reminded == 1).await;
    assert_eq!(names(&notify.calls()), ["ask", "remind"]);

    clock.advance(ANSWER_WITHIN);
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    assert_eq!(h.decision().await.unwrap(), Some(Decision::Expired));
    let calls = notify.calls();
    assert_eq!(names(&calls), ["ask", "remind", "tell"]);
    assert!(
        matches!(&calls[2], NotifyCall::Tell { employee, text } if employee == "ana" && text.contains("expired")),
        "{calls:?}"
    );
}

#[tokio::test]
async fn an_answer_within_the_two_days_ends_it_without_a_reminder() {
    let (builder, clock) = testing::engine();
    let notify = Script::<NotifyProxy>::new();
    notify.reply("ask", OK);
    let engine = builder
        .flow::<Approval>()
        .script(notify.clone())
        .start()
        .await
        .unwrap();
    let h = engine
        .start::<Approval>("r-2", request("EXP-10", "jon", 12_950))
        .await
        .unwrap();
    until(&h, |s| s.asked).await;
    clock.advance(Duration::from_hours(47));
    engine
        .impulse_by_key::<Approval>("EXP-10", ApprovalImpulse::Approve { by: "maria".into() })
        .await
        .unwrap();
    // The employee is told only once the test gives the reply: the call waits for it.
    until(&h, |s| s.decision.is_some()).await;
    assert_eq!(notify.waiting(), 1);
    notify.reply("tell", OK);
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    assert_eq!(names(&notify.calls()), ["ask", "tell"]);
}

#[tokio::test]
async fn a_failed_attempt_is_sent_again_when_the_clock_passes_its_backoff() {
    let (builder, clock) = testing::engine();
    let notify = Script::<NotifyProxy>::new();
    notify
        .reply("ask", Err::<(), _>(NotifyError))
        .reply("ask", OK);
    let engine = builder
        .flow::<Approval>()
        .script(notify.clone())
        .start()
        .await
        .unwrap();
    let h = engine
        .start::<Approval>("r-3", request("EXP-11", "lea", 100))
        .await
        .unwrap();
    // The first attempt failed; its backoff (50-100 ms on the flow's clock) has not passed.
    for _ in 0..2_000 {
        if engine
            .history::<Approval>("r-3", 0, 10)
            .await
            .unwrap()
            .steps
            .len()
            >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        notify.calls().len(),
        1,
        "real time does not move the flow's clock"
    );
    clock.advance(Duration::from_secs(1));
    until(&h, |s| s.asked).await;
    assert_eq!(names(&notify.calls()), ["ask", "ask"]);
}
