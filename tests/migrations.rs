#![allow(missing_docs)] // test-local flows
//! Versions and migrations, through the public API: an instance written by version N−1 of a
//! flow that declares `#[flow(version = N, migrate = f)]` is upgraded with `f` when the new
//! engine loads it, and goes on under version N. An instance of a version with no migration
//! path, or whose migration panics, is parked with a reason naming both versions, never run
//! with the wrong code; an operator can still patch and resume it. Migrations chain:
//! `migrate = [v1_to_v2, v2_to_v3]` reads records of versions 1 and 2, each step declared
//! once.

use flowwire::Error;
use flowwire::prelude::*;

/// Version 1 kept a bare amount.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InvoiceV1 {
    cents: u64,
    paid: bool,
}

#[flow(name = "Invoice", version = 1)]
pub struct InvoiceOne {
    #[link]
    state: InvoiceV1,
}

#[flow]
impl InvoiceOne {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.paid {
            Command::finish()
        } else {
            Command::wait()
        }
    }

    #[impulse]
    fn pay(&mut self) {
        self.state.paid = true;
    }
}

/// Version 2 adds a currency (and a note of where the amount came from).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InvoiceV2 {
    cents: u64,
    currency: String,
    paid: bool,
    migrated: bool,
}

fn upgrade(old: InvoiceV1) -> InvoiceV2 {
    assert!(old.cents != 13, "unlucky invoice");
    InvoiceV2 {
        cents: old.cents,
        currency: "EUR".into(),
        paid: old.paid,
        migrated: true,
    }
}

#[flow(name = "Invoice", version = 2, migrate = upgrade)]
pub struct InvoiceTwo {
    #[link]
    state: InvoiceV2,
}

#[flow]
impl InvoiceTwo {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.paid {
            Command::finish()
        } else {
            Command::wait()
        }
    }

    #[impulse]
    fn pay(&mut self) {
        self.state.paid = true;
    }

    /// Sets the currency (to the one it has: a step that changes nothing).
    #[impulse]
    fn currency(&mut self, code: String) {
        self.state.currency = code;
    }
}

/// Version 3 migrates only from version 2.
#[flow(name = "Invoice", version = 3, migrate = Self::from_two)]
pub struct InvoiceThree {
    #[link]
    state: InvoiceV2,
}

impl InvoiceThree {
    fn from_two(old: InvoiceV2) -> InvoiceV2 {
        old
    }
}

#[flow]
impl InvoiceThree {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.paid {
            Command::finish()
        } else {
            Command::wait()
        }
    }
}

/// An engine running flow `F` on the data in `dir`.
async fn open<F: flowwire::Flow>(dir: &std::path::Path) -> Engine {
    Engine::builder()
        .data_dir(dir)
        .flow::<F>()
        .start()
        .await
        .unwrap()
}

/// Writes waiting version-1 invoices into `dir`.
async fn written_by_v1(dir: &std::path::Path, invoices: &[(&str, u64)]) {
    let v1 = open::<InvoiceOne>(dir).await;
    for (id, cents) in invoices {
        let state = InvoiceV1 {
            cents: *cents,
            paid: false,
        };
        v1.start::<InvoiceOne>(*id, state).await.unwrap();
    }
    v1.shutdown().await;
}

#[tokio::test]
async fn an_instance_of_the_previous_version_is_migrated_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    written_by_v1(dir.path(), &[("inv-1", 4_200)]).await;

    let v2 = open::<InvoiceTwo>(dir.path()).await;
    let h = v2.handle::<InvoiceTwo>("inv-1").await.unwrap();
    h.pay().await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    assert_eq!(
        h.state().await.unwrap(),
        InvoiceV2 {
            cents: 4_200,
            currency: "EUR".into(),
            paid: true,
            migrated: true
        }
    );
    v2.shutdown().await;

    // Version 3 reads what version 2 wrote (it ended under version 2).
    let v3 = open::<InvoiceThree>(dir.path()).await;
    let h = v3.handle::<InvoiceThree>("inv-1").await.unwrap();
    assert_eq!(h.state().await.unwrap().currency, "EUR");
}

#[tokio::test]
async fn an_instance_two_versions_behind_is_parked_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    written_by_v1(dir.path(), &[("inv-2", 100)]).await;
    let v3 = open::<InvoiceThree>(dir.path()).await;
    let h = v3.handle::<InvoiceThree>("inv-2").await.unwrap();
    let r = h.finished().await;
    let Err(Error::Quarantined { reason, .. }) = &r else {
        panic!("never run with the wrong code: {r:?}")
    };
    assert!(
        reason.contains("version 1")
            && reason.contains("version 3")
            && reason.contains("migrates only from version 2"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_migration_that_panics_parks_the_instance() {
    let dir = tempfile::tempdir().unwrap();
    written_by_v1(dir.path(), &[("inv-13", 13), ("inv-14", 14)]).await;
    let v2 = open::<InvoiceTwo>(dir.path()).await;
    let bad = v2.handle::<InvoiceTwo>("inv-13").await.unwrap();
    let r = bad.finished().await;
    assert!(
        matches!(&r, Err(Error::Quarantined { reason, .. })
            if reason.contains("migration from version 1 panicked: unlucky invoice")),
        "{r:?}"
    );
    let good = v2.handle::<InvoiceTwo>("inv-14").await.unwrap();
    good.pay().await.unwrap();
    assert_eq!(
        good.finished().await.unwrap(),
        Ended::Finished,
        "the other instances go on"
    );
}

/// Version 3, the chained way: it keeps version 2's migration from version 1 and adds its
/// own from version 2, each declared once, so it reads records of versions 1 and 2.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InvoiceV3 {
    cents: u64,
    currency: String,
    paid: bool,
    migrated: bool,
    /// New in version 3.
    reference: String,
}

fn two_to_three(old: InvoiceV2) -> InvoiceV3 {
    InvoiceV3 {
        reference: format!("INV-{}", old.cents),
        cents: old.cents,
        currency: old.currency,
        paid: old.paid,
        migrated: old.migrated,
    }
}

#[flow(name = "Invoice", version = 3, migrate = [upgrade, two_to_three])]
pub struct InvoiceChain {
    #[link]
    state: InvoiceV3,
}

#[flow]
impl InvoiceChain {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.paid {
            Command::finish()
        } else {
            Command::wait()
        }
    }

    #[impulse]
    fn pay(&mut self) {
        self.state.paid = true;
    }
}

#[tokio::test]
async fn migrations_chain_a_record_two_versions_behind_through_each_step() {
    let dir = tempfile::tempdir().unwrap();
    written_by_v1(dir.path(), &[("inv-21", 2_100), ("inv-22", 2_200)]).await;
    // inv-22 is moved on to version 2 first; inv-21 stays at version 1.
    let v2 = open::<InvoiceTwo>(dir.path()).await;
    v2.handle::<InvoiceTwo>("inv-22")
        .await
        .unwrap()
        .currency("EUR".into())
        .await
        .unwrap();
    v2.shutdown().await;

    let v3 = open::<InvoiceChain>(dir.path()).await;
    for (id, cents) in [("inv-21", 2_100), ("inv-22", 2_200)] {
        let h = v3.handle::<InvoiceChain>(id).await.unwrap();
        h.pay().await.unwrap();
        assert_eq!(h.finished().await.unwrap(), Ended::Finished, "{id}");
        assert_eq!(
            h.state().await.unwrap(),
            InvoiceV3 {
                cents,
                currency: "EUR".into(),
                paid: true,
                migrated: true,
                reference: format!("INV-{cents}"),
            },
            "{id}: through version 2's migration (the currency) and version 3's (the reference)"
        );
    }
}

#[tokio::test]
async fn a_migrated_state_is_written_even_by_a_step_that_leaves_it_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    written_by_v1(dir.path(), &[("inv-31", 3_100)]).await;
    let v2 = open::<InvoiceTwo>(dir.path()).await;
    // The impulse sets the currency the migration set: the step changes nothing, but it is
    // the first under version 2.
    v2.handle::<InvoiceTwo>("inv-31")
        .await
        .unwrap()
        .currency("EUR".into())
        .await
        .unwrap();
    v2.shutdown().await;
    // A fresh engine reads the stored record: version 2, with version 2's state.
    let again = open::<InvoiceTwo>(dir.path()).await;
    let h = again.handle::<InvoiceTwo>("inv-31").await.unwrap();
    assert_eq!(
        h.state().await.unwrap(),
        InvoiceV2 {
            cents: 3_100,
            currency: "EUR".into(),
            paid: false,
            migrated: true
        }
    );
    let page = again.history::<InvoiceTwo>("inv-31", 0, 10).await.unwrap();
    assert_eq!(
        page.steps.len(),
        2,
        "the start, and the impulse under version 2"
    );
}

#[tokio::test]
async fn an_engine_of_an_older_version_leaves_a_newer_record_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    written_by_v1(dir.path(), &[("inv-41", 4_100)]).await;
    // A version-2 engine moves the instance on to version 2.
    let v2 = open::<InvoiceTwo>(dir.path()).await;
    v2.handle::<InvoiceTwo>("inv-41")
        .await
        .unwrap()
        .currency("CHF".into())
        .await
        .unwrap();
    v2.shutdown().await;

    // A version-1 engine (a node not upgraded yet) neither parks nor runs it.
    let v1 = open::<InvoiceOne>(dir.path()).await;
    let r = v1.handle::<InvoiceOne>("inv-41").await;
    assert!(
        matches!(
            r,
            Err(Error::NewerVersion {
                written: 2,
                running: 1,
                ..
            })
        ),
        "{r:?}"
    );
    let parked = v1.parked::<InvoiceOne>(None, 10).await.unwrap();
    assert!(parked.is_empty(), "not parked: {parked:?}");
    v1.shutdown().await;

    // The version-2 engine finds it as it left it.
    let v2 = open::<InvoiceTwo>(dir.path()).await;
    let h = v2.handle::<InvoiceTwo>("inv-41").await.unwrap();
    assert_eq!(h.state().await.unwrap().currency, "CHF");
    h.pay().await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    let page = v2.history::<InvoiceTwo>("inv-41", 0, 10).await.unwrap();
    assert_eq!(
        page.steps.len(),
        3,
        "start, currency, pay: nothing written by version 1"
    );
}

#[tokio::test]
async fn an_ended_instance_is_read_as_this_versions_state_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    written_by_v1(dir.path(), &[("inv-51", 5_100)]).await;
    // It ends under version 1.
    let v1 = open::<InvoiceOne>(dir.path()).await;
    let h = v1.handle::<InvoiceOne>("inv-51").await.unwrap();
    h.pay().await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    v1.shutdown().await;

    // Version 3 reads it through its migrations, not as raw version-1 bytes.
    let v3 = open::<InvoiceChain>(dir.path()).await;
    let h = v3.handle::<InvoiceChain>("inv-51").await.unwrap();
    assert_eq!(h.state().await.unwrap().reference, "INV-5100");
    v3.shutdown().await;

    // Version 1 does not read what version 2 wrote.
    written_by_v1(dir.path(), &[("inv-52", 5_200)]).await;
    let v2 = open::<InvoiceTwo>(dir.path()).await;
    let h = v2.handle::<InvoiceTwo>("inv-52").await.unwrap();
    h.pay().await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
    v2.shutdown().await;
    let v1 = open::<InvoiceOne>(dir.path()).await;
    let r = v1
        .handle::<InvoiceOne>("inv-52")
        .await
        .unwrap()
        .state()
        .await;
    assert!(
        matches!(
            r,
            Err(Error::NewerVersion {
                written: 2,
                running: 1,
                ..
            })
        ),
        "{r:?}"
    );
}
