use flowwire::prelude::*;

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("declined")]
pub struct Declined;

#[driver(timeout = "500ms", retries = 2)]
pub trait Payment {
    async fn charge(&self, cents: u64) -> Result<u64, Declined>;
    async fn refund(&self, charge: u64, reason: String) -> Result<(), Declined>;
}

#[driver]
pub trait Mail {
    async fn send(&self, to: String) -> Result<(), Declined>;
}

#[derive(Default, Serialize, Deserialize)]
pub struct State {
    paid: Option<u64>,
    mailed: bool,
    cancelled: bool,
}

#[flow(version = 2, name = "checkout")]
pub struct Checkout {
    #[link]
    state: State,
    #[link]
    payment: impl Payment,
    #[link]
    mail: impl Mail,
}

#[flow]
impl Checkout {
    #[impulse]
    fn cancel(&mut self, reason: String) {
        let _ = reason;
        self.state.cancelled = true;
    }

    #[probe]
    fn paid(&self) -> Option<u64> {
        self.state.paid
    }

    #[probe]
    fn is_over(&self, limit: u64) -> bool {
        self.state.paid.is_some_and(|p| p > limit)
    }

    fn helper(&self) -> bool {
        self.state.cancelled
    }

    #[wire]
    fn step(&mut self) -> Command<Self> {
        if self.helper() {
            return Command::fail("cancelled");
        }
        match (self.state.paid, self.state.mailed) {
            (None, _) => Command::drive(self.payment.charge(100)).then(|f, r| {
                f.state.paid = Some(r?);
                Ok(())
            }),
            (Some(_), false) => Command::drive(self.mail.send("a@b.c".into())).then(|f, r| {
                r?;
                f.state.mailed = true;
                Ok(())
            }),
            _ => Command::finish(),
        }
    }
}

struct Both;

#[driver]
impl Payment for Both {
    async fn charge(&self, cents: u64) -> Result<u64, Declined> {
        Ok(cents)
    }
    async fn refund(&self, _charge: u64, _reason: String) -> Result<(), Declined> {
        Ok(())
    }
}

#[driver]
impl Mail for Both {
    async fn send(&self, _to: String) -> Result<(), Declined> {
        Ok(())
    }
}

async fn build() -> Result<(), flowwire::Error> {
    let engine = Engine::builder()
        .in_memory()
        .flow::<Checkout>()
        .driver::<PaymentProxy, _>(Both)
        .driver::<MailProxy, _>(Both)
        .start()
        .await?;
    let h = engine.start::<Checkout>("c-1", State::default()).await?;
    let _: Option<u64> = h.paid().await?;
    let _: bool = h.is_over(5).await?;
    h.cancel("changed my mind".into()).id("req-1").await?;
    let _: Ended = h.finished().await?;
    Ok(())
}

fn main() {
    let _ = build;
}
