#![allow(missing_docs)] // test-local flows
//! Versions and migrations, through the public API: an instance written by version N−1 of a
//! flow that declares `#[flow(version = N, migrate = f)]` is upgraded with `f` when the new
//! engine loads it, and goes on under version N. An instance of a version with no migration
//! path, or whose migration panics, is parked with a reason naming both versions, never run
//! with the wrong code; an operator can still patch and resume it. Migrations chain:
//! `migrate = [v1_to_v2, v2_to_v3]` reads records of versions 1 and 2, each step declared
//! once. `Engine::check_upgrade` tells, before a deploy and without writing anything,
//! which live instances a version would park, and why.

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

/// Sends three reminders, an hour apart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Dunning {
    sent: u32,
}

#[flow(name = "Dunning", version = 1)]
pub struct DunningOne {
    #[link]
    state: Dunning,
}

#[flow]
impl DunningOne {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.sent >= 3 {
            return Command::finish();
        }
        Command::sleep(std::time::Duration::from_hours(1)).then(|f| {
            f.state.sent += 1;
            Ok(())
        })
    }
}

fn same(d: Dunning) -> Dunning {
    d
}

/// Version 2 waits two hours between reminders: a timer armed by version 1 no longer
/// matches its wire.
#[flow(name = "Dunning", version = 2, migrate = same)]
pub struct DunningSlower {
    #[link]
    state: Dunning,
}

#[flow]
impl DunningSlower {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.sent >= 3 {
            return Command::finish();
        }
        Command::sleep(std::time::Duration::from_hours(2)).then(|f| {
            f.state.sent += 1;
            Ok(())
        })
    }
}

/// An engine on `dir` that runs no flow: it loads (and parks) nothing.
async fn inspector(dir: &std::path::Path) -> Engine {
    Engine::builder().data_dir(dir).start().await.unwrap()
}

#[tokio::test]
async fn check_upgrade_lists_the_live_instances_a_version_would_park_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    written_by_v1(
        dir.path(),
        &[("inv-61", 6_100), ("inv-13", 13), ("inv-62", 6_200)],
    )
    .await;
    // An ended instance is not live: no version loads it.
    let v1 = open::<InvoiceOne>(dir.path()).await;
    let h = v1.handle::<InvoiceOne>("inv-62").await.unwrap();
    h.pay().await.unwrap();
    h.finished().await.unwrap();
    v1.shutdown().await;

    let engine = inspector(dir.path()).await;
    let two = engine.check_upgrade::<InvoiceTwo>().await.unwrap();
    assert_eq!((two.flow, two.version, two.checked), ("Invoice", 2, 2));
    assert!(!two.is_safe());
    assert_eq!(two.would_park.len(), 1, "{two:?}");
    let bad = &two.would_park[0];
    assert_eq!((bad.id.as_str(), bad.written), ("inv-13", 1));
    assert!(
        bad.reason
            .contains("migration from version 1 panicked: unlucky invoice"),
        "{}",
        bad.reason
    );
    let three = engine.check_upgrade::<InvoiceThree>().await.unwrap();
    let ids: Vec<&str> = three.would_park.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["inv-13", "inv-61"]);
    assert!(
        three
            .would_park
            .iter()
            .all(|p| p.reason.contains("migrates only from version 2")),
        "{three:?}"
    );
    let chain = engine.check_upgrade::<InvoiceChain>().await.unwrap();
    let ids: Vec<&str> = chain.would_park.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(
        ids,
        ["inv-13"],
        "the chain reaches version 1, except the unlucky one"
    );
    engine.shutdown().await;

    // Nothing was written: each live instance has its one start step, and version 2 then
    // parks exactly the instance the check named, with the reason it gave.
    let v2 = open::<InvoiceTwo>(dir.path()).await;
    for id in ["inv-61", "inv-13"] {
        let page = v2.history::<InvoiceTwo>(id, 0, 10).await.unwrap();
        assert!(page.steps.len() <= 2, "{id}: {:?}", page.steps);
    }
    let r = v2
        .handle::<InvoiceTwo>("inv-13")
        .await
        .unwrap()
        .finished()
        .await;
    assert!(
        matches!(&r, Err(Error::Quarantined { reason, .. }) if *reason == bad.reason),
        "{r:?}"
    );
    let good = v2.handle::<InvoiceTwo>("inv-61").await.unwrap();
    good.pay().await.unwrap();
    assert_eq!(good.finished().await.unwrap(), Ended::Finished);
}

#[tokio::test]
async fn check_upgrade_finds_a_wire_that_no_longer_returns_what_an_instance_awaits() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = open::<DunningOne>(dir.path()).await;
    v1.start::<DunningOne>("dun-1", Dunning::default())
        .await
        .unwrap();
    v1.shutdown().await;

    let engine = inspector(dir.path()).await;
    let slower = engine.check_upgrade::<DunningSlower>().await.unwrap();
    assert_eq!(slower.checked, 1);
    let [p] = &slower.would_park[..] else {
        panic!("{slower:?}");
    };
    assert_eq!((p.id.as_str(), p.written), ("dun-1", 1));
    assert!(
        p.reason
            .contains("non-deterministic wire: a timer is armed"),
        "{}",
        p.reason
    );
    // Its own version runs it.
    assert!(
        engine
            .check_upgrade::<DunningOne>()
            .await
            .unwrap()
            .is_safe()
    );
}

#[tokio::test]
async fn check_upgrade_lists_records_a_newer_version_wrote_as_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    written_by_v1(dir.path(), &[("inv-71", 7_100)]).await;
    let v2 = open::<InvoiceTwo>(dir.path()).await;
    v2.handle::<InvoiceTwo>("inv-71")
        .await
        .unwrap()
        .currency("SEK".into())
        .await
        .unwrap();
    v2.shutdown().await;

    let engine = inspector(dir.path()).await;
    let one = engine.check_upgrade::<InvoiceOne>().await.unwrap();
    assert!(one.is_safe(), "{one:?}");
    assert_eq!(one.newer, vec![("inv-71".to_string(), 2)]);
}
