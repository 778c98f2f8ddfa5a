//! User sign-up: create the account, mail a code, wait for it, welcome or clean up.
//!
//! `cargo run --example user_signup` — a sign-up creates the account (registering its
//! deletion as the compensation), mails a verification code, then waits for the `verify`
//! impulse, found by e-mail address (`Engine::impulse_by_key`), with a timeout. A right
//! code sends the welcome mail and finishes; three wrong codes, or no code in time, fail the
//! sign-up, which deletes the account it created. Typed impulses carry their payload; a
//! probe reads how many attempts are left while the flow waits.
//!
//! The wait is scaled down so the example runs in a second (a day, in a real deployment).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowwire::prelude::*;

/// How long a code is valid.
const VERIFY_WITHIN: Duration = Duration::from_secs(1);
/// Wrong codes allowed.
const ATTEMPTS: u32 = 3;

/// Why the account service or the mailer failed.
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("{0}")]
pub struct ServiceError(String);

/// The account database.
#[driver(timeout = "5s", retries = 3)]
pub trait Accounts {
    /// Creates an account (idempotent per call: the key comes from the call context).
    async fn create(&self, email: String) -> Result<u64, ServiceError>;
    /// Deletes an account created for this address.
    async fn delete(&self, email: String) -> Result<(), ServiceError>;
}

/// The mailer.
#[driver(timeout = "5s", retries = 3)]
pub trait Mailer {
    /// Mails the verification code.
    async fn send_code(&self, email: String, code: u32) -> Result<(), ServiceError>;
    /// Mails the welcome.
    async fn welcome(&self, email: String, user: u64) -> Result<(), ServiceError>;
}

/// How the wait for the code ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entered {
    /// The right code arrived.
    InTime,
    /// The wait ran out.
    TooLate,
}

/// One sign-up.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SignupState {
    /// The address (the correlation key).
    pub email: String,
    /// The code mailed (in a real service, keep a hash).
    pub code: u32,
    /// The account, once created.
    pub user: Option<u64>,
    /// The code was mailed.
    pub mailed: bool,
    /// Wrong codes so far.
    pub wrong: u32,
    /// How the wait for the code ended.
    pub code_entered: Option<Entered>,
    /// The welcome was mailed.
    pub welcomed: bool,
}

/// The sign-up board.
#[flow]
pub struct Signup {
    #[link]
    state: SignupState,
    #[link]
    accounts: impl Accounts,
    #[link]
    mailer: impl Mailer,
}

#[flow]
impl Signup {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let s = &self.state;
        let email = s.email.clone();
        if s.user.is_none() {
            return Command::drive(self.accounts.create(email.clone()))
                .compensate(self.accounts.delete(email))
                .then(|f, r| {
                    f.state.user = Some(r?);
                    Ok(())
                });
        }
        if !s.mailed {
            return Command::drive(self.mailer.send_code(email, s.code)).then(|f, r| {
                r?;
                f.state.mailed = true;
                Ok(())
            });
        }
        if s.wrong >= ATTEMPTS {
            return Command::fail(format!("{ATTEMPTS} wrong codes"));
        }
        if s.code_entered == Some(Entered::TooLate) {
            return Command::fail("the code was not entered in time");
        }
        if s.code_entered.is_none() {
            // A wrong code is applied (counted) and the wire returns the same wait: the
            // timer keeps its time.
            return Command::wait_timeout(VERIFY_WITHIN).then(|f| {
                f.state.code_entered = Some(Entered::TooLate);
                Ok(())
            });
        }
        if !s.welcomed {
            let user = s.user.unwrap_or_default();
            return Command::drive(self.mailer.welcome(email, user)).then(|f, r| {
                r?;
                f.state.welcomed = true;
                Ok(())
            });
        }
        Command::finish()
    }

    /// The user entered a code.
    #[impulse]
    fn verify(&mut self, code: u32) {
        if code == self.state.code {
            self.state.code_entered.get_or_insert(Entered::InTime);
        } else {
            self.state.wrong += 1;
        }
    }

    /// Wrong codes the user may still enter.
    #[probe]
    fn attempts_left(&self) -> u32 {
        ATTEMPTS.saturating_sub(self.state.wrong)
    }

    /// Sign-ups are found by address.
    #[correlate]
    fn email(&self) -> &str {
        &self.state.email
    }
}

/// The account database and the mailer (here: in-process).
#[derive(Default)]
struct Services {
    accounts: Mutex<BTreeSet<String>>,
}

#[driver]
impl Accounts for Arc<Services> {
    async fn create(&self, email: String) -> Result<u64, ServiceError> {
        println!("  accounts  create {email}");
        let mut accounts = self.accounts.lock().expect("accounts");
        accounts.insert(email);
        Ok(accounts.len() as u64)
    }
    async fn delete(&self, email: String) -> Result<(), ServiceError> {
        println!("  accounts  delete {email}");
        self.accounts.lock().expect("accounts").remove(&email);
        Ok(())
    }
}

#[driver]
impl Mailer for Arc<Services> {
    async fn send_code(&self, email: String, code: u32) -> Result<(), ServiceError> {
        println!("  mail      {email}: your code is {code}");
        Ok(())
    }
    async fn welcome(&self, email: String, user: u64) -> Result<(), ServiceError> {
        println!("  mail      {email}: welcome, user #{user}");
        Ok(())
    }
}

async fn enter(engine: &Engine, email: &str, code: u32) -> Result<(), flowwire::Error> {
    println!("  user      {email} enters {code}");
    engine
        .impulse_by_key::<Signup>(email, SignupImpulse::Verify { code })
        .await
}

/// Waits until the sign-up mailed its code (the user reads it before typing it).
async fn mailed(h: &SignupHandle) -> Result<(), flowwire::Error> {
    for _ in 0..2_000 {
        if h.state().await?.mailed {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(flowwire::Error::Timeout {
        op: "mailed",
        after: Duration::from_secs(10),
    })
}

fn signup(email: &str, code: u32) -> SignupState {
    SignupState {
        email: email.into(),
        code,
        ..SignupState::default()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let services = Arc::new(Services::default());
    let engine = Engine::builder()
        .data_dir(dir.path())
        .flow::<Signup>()
        .driver::<AccountsProxy, _>(services.clone())
        .driver::<MailerProxy, _>(services.clone())
        .start()
        .await?;

    println!("alice: a typo, then the right code");
    let alice = engine
        .start::<Signup>("s-alice", signup("alice@example.com", 4711))
        .await?;
    mailed(&alice).await?;
    enter(&engine, "alice@example.com", 4117).await?;
    println!(
        "  probe     attempts left: {}",
        alice.attempts_left().await?
    );
    enter(&engine, "alice@example.com", 4711).await?;
    println!("  ended     {:?}", alice.finished().await?);

    println!("bob: never enters the code");
    let bob = engine
        .start::<Signup>("s-bob", signup("bob@example.com", 1234))
        .await?;
    let ended = bob.finished().await?;
    println!("  ended     {ended:?}");
    assert!(matches!(ended, Ended::Failed { .. }));

    println!("carol: three wrong codes");
    let carol = engine
        .start::<Signup>("s-carol", signup("carol@example.com", 9999))
        .await?;
    mailed(&carol).await?;
    for code in [1, 2, 3] {
        enter(&engine, "carol@example.com", code).await?;
    }
    let ended = carol.finished().await?;
    println!("  ended     {ended:?}");
    assert_eq!(
        ended,
        Ended::Failed {
            reason: format!("{ATTEMPTS} wrong codes"),
            error: None
        }
    );

    let accounts = services.accounts.lock().expect("accounts").clone();
    println!("accounts  {accounts:?}");
    assert_eq!(
        accounts.into_iter().collect::<Vec<_>>(),
        ["alice@example.com"],
        "the failed sign-ups deleted the accounts they created"
    );
    engine.shutdown().await;
    Ok(())
}
