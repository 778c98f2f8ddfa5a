#![allow(missing_docs)] // test-local flows
//! Correlation keys, through the public API: a flow declares a key derived from its state
//! (`#[correlate]`); `Engine::impulse_by_key` and `Engine::by_key` find the live instance
//! with that key through the store's index. No instance, or several, is a typed error; an
//! instance that ended leaves the index; a key can appear later in the state, and the
//! index survives a restart.

use flowwire::Error;
use flowwire::prelude::*;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OrderState {
    order_id: String,
    paid: bool,
}

#[flow]
pub struct Order {
    #[link]
    state: OrderState,
}

#[flow]
impl Order {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.paid {
            Command::finish()
        } else {
            Command::wait()
        }
    }

    #[impulse]
    fn paid(&mut self) {
        self.state.paid = true;
    }

    #[correlate]
    fn order_id(&self) -> &str {
        &self.state.order_id
    }
}

/// A support ticket gets its number after it is filed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TicketState {
    number: Option<u64>,
    closed: bool,
}

#[flow]
pub struct Ticket {
    #[link]
    state: TicketState,
}

#[flow]
impl Ticket {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.closed {
            Command::finish()
        } else {
            Command::wait()
        }
    }

    #[impulse]
    fn numbered(&mut self, number: u64) {
        self.state.number = Some(number);
    }

    #[impulse]
    fn close(&mut self) {
        self.state.closed = true;
    }

    #[correlate]
    fn number(&self) -> Option<u64> {
        self.state.number
    }
}

fn order(id: &str) -> OrderState {
    OrderState {
        order_id: id.into(),
        paid: false,
    }
}

async fn engine(dir: Option<&std::path::Path>) -> Engine {
    let b = Engine::builder().flow::<Order>().flow::<Ticket>();
    let b = match dir {
        Some(d) => b.data_dir(d),
        None => b.in_memory(),
    };
    b.start().await.unwrap()
}

#[tokio::test]
async fn an_impulse_by_key_reaches_the_one_instance_with_that_key() {
    let engine = engine(None).await;
    let a = engine.start::<Order>("i-1", order("A-1")).await.unwrap();
    let b = engine.start::<Order>("i-2", order("A-2")).await.unwrap();

    engine
        .impulse_by_key::<Order>("A-1", OrderImpulse::Paid {})
        .await
        .unwrap();
    assert_eq!(a.finished().await.unwrap(), Ended::Finished);
    assert!(
        !b.state().await.unwrap().paid,
        "the other order is untouched"
    );

    let found = engine.by_key::<Order>("A-2").await.unwrap();
    assert_eq!(found.id(), "i-2");
    found.paid().await.unwrap();
    assert_eq!(b.finished().await.unwrap(), Ended::Finished);
    assert_eq!(
        engine.metadata().flows[0].correlation,
        Some("order_id"),
        "the metadata names the key"
    );
}

#[tokio::test]
async fn no_instance_or_several_for_a_key_are_typed_errors() {
    let engine = engine(None).await;
    let r = engine
        .impulse_by_key::<Order>("nope", OrderImpulse::Paid {})
        .await;
    assert!(
        matches!(&r, Err(Error::NoInstanceForKey { flow: "Order", key }) if key == "nope"),
        "{r:?}"
    );

    engine.start::<Order>("x-1", order("DUP")).await.unwrap();
    engine.start::<Order>("x-2", order("DUP")).await.unwrap();
    let r = engine.by_key::<Order>("DUP").await;
    let Err(Error::KeyAmbiguous { ids, .. }) = &r else {
        panic!(
            "several instances with one key: {:?}",
            r.map(|h| h.id().to_string())
        )
    };
    assert_eq!(ids, &["x-1", "x-2"]);
    assert!(r.err().unwrap().to_string().contains("x-1, x-2"));
}

#[tokio::test]
async fn an_ended_instance_leaves_the_index_so_its_key_can_be_used_again() {
    let engine = engine(None).await;
    let first = engine.start::<Order>("o-1", order("K")).await.unwrap();
    first.paid().await.unwrap();
    first.finished().await.unwrap();
    assert!(matches!(
        engine.by_key::<Order>("K").await,
        Err(Error::NoInstanceForKey { .. })
    ));
    engine.start::<Order>("o-2", order("K")).await.unwrap();
    assert_eq!(engine.by_key::<Order>("K").await.unwrap().id(), "o-2");
}

#[tokio::test]
async fn a_key_that_appears_later_in_the_state_is_indexed_then() {
    let engine = engine(None).await;
    let t = engine
        .start::<Ticket>("t-1", TicketState::default())
        .await
        .unwrap();
    assert!(matches!(
        engine.by_key::<Ticket>("42").await,
        Err(Error::NoInstanceForKey { .. })
    ));
    t.numbered(42).await.unwrap();
    engine
        .impulse_by_key::<Ticket>("42", TicketImpulse::Close {})
        .await
        .unwrap();
    assert_eq!(t.finished().await.unwrap(), Ended::Finished);
}

#[tokio::test]
async fn the_key_index_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let engine1 = engine(Some(dir.path())).await;
    engine1.start::<Order>("d-1", order("D-1")).await.unwrap();
    engine1.shutdown().await;

    let engine2 = engine(Some(dir.path())).await;
    engine2
        .impulse_by_key::<Order>("D-1", OrderImpulse::Paid {})
        .await
        .unwrap();
    let h = engine2.handle::<Order>("d-1").await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
}

/// A retry by key of an impulse that ended its instance (its first reply lost, say) is
/// told the impulse was applied — not that no instance has the key — across a restart;
/// and a newer instance that took the key over does not get it. An impulse id the ended
/// instance never saw still finds no instance (issue 23, item 5).
#[tokio::test]
async fn a_retry_by_key_after_the_instance_ended_is_told_it_was_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let e = engine(Some(tmp.path())).await;
    let first = e.start::<Order>("r-1", order("R-1")).await.unwrap();
    e.impulse_by_key::<Order>("R-1", OrderImpulse::Paid {})
        .id("payment-1")
        .await
        .unwrap();
    assert_eq!(first.finished().await.unwrap(), Ended::Finished);
    e.shutdown().await;

    let e = engine(Some(tmp.path())).await;
    let retry = e
        .impulse_by_key::<Order>("R-1", OrderImpulse::Paid {})
        .id("payment-1")
        .await;
    assert!(
        matches!(&retry, Err(Error::ImpulseAlreadyApplied { id, impulse_id, .. }) if id == "r-1" && impulse_id == "payment-1"),
        "{retry:?}"
    );
    let other = e
        .impulse_by_key::<Order>("R-1", OrderImpulse::Paid {})
        .id("payment-2")
        .await;
    assert!(
        matches!(&other, Err(Error::NoInstanceForKey { .. })),
        "{other:?}"
    );

    // A newer order under the same key: the retry is still answered from the ended one.
    let newer = e.start::<Order>("r-2", order("R-1")).await.unwrap();
    let retry = e
        .impulse_by_key::<Order>("R-1", OrderImpulse::Paid {})
        .id("payment-1")
        .await;
    assert!(
        matches!(&retry, Err(Error::ImpulseAlreadyApplied { .. })),
        "{retry:?}"
    );
    assert!(
        !newer.state().await.unwrap().paid,
        "the newer order is untouched"
    );
    e.shutdown().await;
}
