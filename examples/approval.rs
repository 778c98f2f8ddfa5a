//! An expense approval: an impulse with a timeout, found by its correlation key.
//!
//! `cargo run --example approval` — a request asks the manager, then waits for a decision
//! (an impulse). The wait has a timeout: the first time it runs out the manager is
//! reminded; the second time the request expires. A decision arrives by expense number
//! (`Engine::impulse_by_key`), whoever holds that number: the web handler that receives
//! the manager's click does not know the instance id.
//!
//! The waits are the real ones, two days each; the example runs them in an instant on a
//! [`ManualClock`](flowwire::ManualClock), which it moves by hand, as a test does. A
//! waiting instance costs only its record meanwhile (it is not in memory).

use std::sync::Arc;
use std::time::Duration;

use flowwire::ManualClock;
use flowwire::prelude::*;

/// How long the manager has to answer before a reminder, and again before the request
/// expires.
pub const ANSWER_WITHIN: Duration = Duration::from_hours(48);

/// Why the notification service failed.
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("the notification service is unavailable")]
pub struct NotifyError;

/// Sends messages to people.
#[driver(timeout = "5s", retries = 3)]
pub trait Notify {
    /// Asks an approver to decide on an expense.
    async fn ask(&self, approver: String, expense: String, cents: u64) -> Result<(), NotifyError>;
    /// Reminds the approver.
    async fn remind(&self, approver: String, expense: String) -> Result<(), NotifyError>;
    /// Tells the employee how it ended.
    async fn tell(&self, employee: String, text: String) -> Result<(), NotifyError>;
}

/// Where a request stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Approved, by whom.
    Approved(String),
    /// Rejected, by whom and why.
    Rejected(String, String),
    /// Nobody answered in time.
    Expired,
}

/// An expense request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExpenseState {
    /// The expense number (the correlation key).
    pub number: String,
    /// Who asked.
    pub employee: String,
    /// Who decides.
    pub approver: String,
    /// How much, in cents.
    pub cents: u64,
    /// The approver was asked.
    pub asked: bool,
    /// Times the wait ran out.
    pub timeouts: u32,
    /// Reminders owed (the wire sends one when this exceeds `reminded`).
    pub reminded: u32,
    /// The decision.
    pub decision: Option<Decision>,
    /// The employee was told.
    pub told: bool,
}

/// The approval board.
#[flow]
pub struct Approval {
    #[link]
    state: ExpenseState,
    #[link]
    notify: impl Notify,
}

#[flow]
impl Approval {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let s = &self.state;
        if !s.asked {
            return Command::drive(
                self.notify
                    .ask(s.approver.clone(), s.number.clone(), s.cents),
            )
            .then(|f, r| {
                r?;
                f.state.asked = true;
                Ok(())
            });
        }
        if let Some(decision) = &s.decision {
            if s.told {
                return Command::finish();
            }
            let text = match decision {
                Decision::Approved(by) => format!("{} approved by {by}", s.number),
                Decision::Rejected(by, why) => format!("{} rejected by {by}: {why}", s.number),
                Decision::Expired => format!("{} expired without an answer", s.number),
            };
            return Command::drive(self.notify.tell(s.employee.clone(), text)).then(|f, r| {
                r?;
                f.state.told = true;
                Ok(())
            });
        }
        if s.timeouts > s.reminded {
            return Command::drive(self.notify.remind(s.approver.clone(), s.number.clone())).then(
                |f, r| {
                    r?;
                    f.state.reminded += 1;
                    Ok(())
                },
            );
        }
        // The timer is armed when this step commits and survives restarts; an impulse
        // that arrives first is applied and the wire runs again.
        Command::wait_timeout(ANSWER_WITHIN).then(|f| {
            f.state.timeouts += 1;
            if f.state.timeouts >= 2 {
                f.state.decision = Some(Decision::Expired);
            }
            Ok(())
        })
    }

    /// The approver approves.
    #[impulse]
    fn approve(&mut self, by: String) {
        if self.state.decision.is_none() {
            self.state.decision = Some(Decision::Approved(by));
        }
    }

    /// The approver rejects.
    #[impulse]
    fn reject(&mut self, by: String, why: String) {
        if self.state.decision.is_none() {
            self.state.decision = Some(Decision::Rejected(by, why));
        }
    }

    /// The decision so far.
    #[probe]
    fn decision(&self) -> Option<Decision> {
        self.state.decision.clone()
    }

    /// Requests are found by their expense number.
    #[correlate]
    fn number(&self) -> &str {
        &self.state.number
    }
}

/// The notification service (here: it prints).
struct Mailer;

#[driver]
impl Notify for Mailer {
    async fn ask(&self, approver: String, expense: String, cents: u64) -> Result<(), NotifyError> {
        println!(
            "  mail  {approver}: please decide on {expense} ({}.{:02} EUR)",
            cents / 100,
            cents % 100
        );
        Ok(())
    }
    async fn remind(&self, approver: String, expense: String) -> Result<(), NotifyError> {
        println!("  mail  {approver}: reminder, {expense} is waiting for you");
        Ok(())
    }
    async fn tell(&self, employee: String, text: String) -> Result<(), NotifyError> {
        println!("  mail  {employee}: {text}");
        Ok(())
    }
}

/// A request for `cents`, from `employee`, for maria to decide.
pub fn request(number: &str, employee: &str, cents: u64) -> ExpenseState {
    ExpenseState {
        number: number.into(),
        employee: employee.into(),
        approver: "maria".into(),
        cents,
        ..ExpenseState::default()
    }
}

/// Waits (bounded) until the request's wait has run out `n` times and its wire waits
/// again or has ended.
async fn until_timeouts(h: &ApprovalHandle, n: u32) -> Result<(), Box<dyn std::error::Error>> {
    for _ in 0..1_000 {
        let s = h.state().await?;
        if s.timeouts >= n && (s.reminded >= s.timeouts || s.decision.is_some()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err("the request did not move on".into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new());
    let engine = Engine::builder()
        .data_dir(dir.path())
        .clock(clock.clone())
        .flow::<Approval>()
        .driver(Mailer)
        .start()
        .await?;

    println!("EXP-1: answered in time");
    let exp1 = engine
        .start::<Approval>("req-1", request("EXP-1", "jon", 12_950))
        .await?;
    clock.advance(Duration::from_hours(20));
    println!("  +20 h");
    // The approval web hook knows the expense number, not the instance id.
    engine
        .impulse_by_key::<Approval>("EXP-1", ApprovalImpulse::Approve { by: "maria".into() })
        .await?;
    exp1.finished().await?;
    let decision = exp1.decision().await?;
    println!("  done  {decision:?}");
    assert_eq!(decision, Some(Decision::Approved("maria".into())));

    println!("EXP-2: never answered");
    let exp2 = engine
        .start::<Approval>("req-2", request("EXP-2", "ana", 4_000))
        .await?;
    while !exp2.state().await?.asked {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for n in 1..=2 {
        clock.advance(ANSWER_WITHIN);
        println!("  +{} h", ANSWER_WITHIN.as_secs() / 3600);
        until_timeouts(&exp2, n).await?;
    }
    exp2.finished().await?;
    let state = exp2.state().await?;
    println!(
        "  done  {:?} after {} timeouts and {} reminder",
        state.decision, state.timeouts, state.reminded
    );
    assert_eq!(state.decision, Some(Decision::Expired));
    assert_eq!((state.timeouts, state.reminded), (2, 1));

    // A late answer finds no live request under that number.
    let late = engine
        .impulse_by_key::<Approval>(
            "EXP-2",
            ApprovalImpulse::Reject {
                by: "maria".into(),
                why: "too late".into(),
            },
        )
        .await;
    println!("  late  {}", late.expect_err("the request ended"));

    engine.shutdown().await;
    Ok(())
}
