//! The queue's tests: the wake-up protocol, case by case (a child of `queue.rs`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{TrySendError, channel};
use crate::engine::job::{CallPolicy, Job};

fn job(seq: u64) -> Job {
    let (reply, _) = crate::engine::outcomes::channel();
    Job {
        flow: "f",
        id: Arc::from("i"),
        seq,
        branch: None,
        method: 0,
        call: bytes::Bytes::new(),
        redelivered: 0,
        attempt: 1,
        policy: CallPolicy {
            timeout: Duration::from_secs(1),
            retries: 0,
            backoff_ms: 0,
            max_backoff_ms: 0,
            park: false,
        },
        names: ("d", "m"),
        reply,
        receipt: None,
    }
}

#[tokio::test]
async fn jobs_come_out_in_order_and_a_full_queue_refuses_without_losing_the_job() {
    let (port, jobs) = channel(2);
    assert!(port.try_send(job(1)).is_ok());
    assert!(port.try_send(job(2)).is_ok());
    match port.try_send(job(3)) {
        Err(TrySendError::Full(j)) => assert_eq!(j.seq, 3),
        _ => panic!("a full queue takes no more"),
    }
    assert_eq!(jobs.recv().await.map(|j| j.seq), Some(1));
    assert!(port.try_send(job(3)).is_ok(), "a taken job makes room");
    assert_eq!(jobs.try_recv().map(|j| j.seq), Some(2));
    assert_eq!(jobs.try_recv().map(|j| j.seq), Some(3));
    assert!(jobs.try_recv().is_none());
}

#[tokio::test]
async fn a_round_of_jobs_is_queued_in_order_as_far_as_there_is_room_and_the_rest_kept() {
    let (port, jobs) = channel(3);
    assert!(port.try_send(job(1)).is_ok());
    let mut round: std::collections::VecDeque<_> = (2..=4).map(job).collect();
    assert!(port.try_send_all(&mut round));
    assert_eq!(
        round.iter().map(|j| j.seq).collect::<Vec<_>>(),
        [4],
        "what did not fit stays with the sender"
    );
    let taken: Vec<_> = std::iter::from_fn(|| jobs.try_recv().map(|j| j.seq)).collect();
    assert_eq!(taken, [1, 2, 3]);
    assert!(port.try_send_all(&mut round));
    assert!(round.is_empty());
    assert_eq!(jobs.recv().await.map(|j| j.seq), Some(4));
    drop(jobs);
}

#[tokio::test]
async fn a_round_of_jobs_wakes_a_waiting_taker_which_takes_them_all() {
    let (port, jobs) = channel(8);
    let taker = tokio::spawn({
        let jobs = jobs.clone();
        async move {
            let first = jobs.recv().await.map(|j| j.seq);
            let rest: Vec<_> = std::iter::from_fn(|| jobs.try_recv().map(|j| j.seq)).collect();
            (first, rest)
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut round: std::collections::VecDeque<_> = (1..=3).map(job).collect();
    assert!(port.try_send_all(&mut round));
    let (first, rest) = tokio::time::timeout(Duration::from_secs(5), taker)
        .await
        .expect("the taker is woken")
        .expect("the taker's task");
    assert_eq!((first, rest), (Some(1), vec![2, 3]));
    drop((port, jobs));
}

#[tokio::test]
async fn a_run_of_jobs_taken_ahead_goes_back_in_order_and_wakes_a_taker_for_it() {
    use std::collections::VecDeque;
    let (port, jobs) = channel(8);
    let mut round: VecDeque<_> = (1..=6).map(job).collect();
    assert!(port.try_send_all(&mut round));
    let seqs = |q: &VecDeque<Job>| q.iter().map(|j| j.seq).collect::<Vec<_>>();
    let mut ahead = VecDeque::new();
    let first = jobs.try_recv_many(&mut ahead, 2).map(|j| j.seq);
    assert_eq!(
        (first, seqs(&ahead)),
        (Some(1), vec![2, 3]),
        "at most 2 ahead"
    );
    jobs.put_back(&mut ahead);
    let first = jobs.try_recv_many(&mut ahead, 8).map(|j| j.seq);
    assert_eq!(
        (first, seqs(&ahead)),
        (Some(2), vec![3, 4, 5, 6]),
        "back in order"
    );
    // A taker waiting on the emptied queue is woken for what is put back.
    let other = jobs.clone();
    let taker = tokio::spawn(async move { other.recv().await.map(|j| j.seq) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    jobs.put_back(&mut ahead);
    assert!(ahead.is_empty());
    let woken = tokio::time::timeout(Duration::from_secs(5), taker).await;
    assert_eq!(woken.expect("a taker is woken").expect("its task"), Some(3));
    let rest: Vec<_> = std::iter::from_fn(|| jobs.try_recv().map(|j| j.seq)).collect();
    assert_eq!(rest, [4, 5, 6]);
    assert!(jobs.try_recv_many(&mut ahead, 3).is_none() && ahead.is_empty());
}

#[tokio::test]
async fn a_waiting_sender_queues_once_a_job_is_taken() {
    let (port, jobs) = channel(1);
    port.try_send(job(1)).ok();
    let sender = tokio::spawn({
        let port = port.clone();
        async move { port.send(job(2)).await.is_ok() }
    });
    tokio::task::yield_now().await;
    assert_eq!(jobs.recv().await.map(|j| j.seq), Some(1));
    assert!(sender.await.unwrap(), "the waiting job went in");
    assert_eq!(jobs.recv().await.map(|j| j.seq), Some(2));
}

#[tokio::test]
async fn a_waiting_taker_wakes_for_a_job_and_ends_when_the_last_port_is_gone() {
    let (port, jobs) = channel(4);
    let taker = tokio::spawn({
        let jobs = jobs.clone();
        async move {
            let mut seen = Vec::new();
            while let Some(j) = jobs.recv().await {
                seen.push(j.seq);
            }
            seen
        }
    });
    tokio::task::yield_now().await;
    let second = port.clone();
    port.try_send(job(1)).ok();
    drop(port);
    second.try_send(job(2)).ok();
    drop(second);
    assert_eq!(
        taker.await.unwrap(),
        vec![1, 2],
        "queued jobs are drained first"
    );
    let (port, jobs) = channel(1);
    drop(jobs);
    assert!(
        port.try_send(job(1)).is_ok(),
        "takers are not counted: closing is by ports"
    );
}

/// Counts the polls of the future it wraps.
struct Polls<'a, F>(std::pin::Pin<Box<F>>, &'a std::sync::atomic::AtomicUsize);

impl<F: Future> Future for Polls<'_, F> {
    type Output = F::Output;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.as_mut().poll(cx)
    }
}

#[tokio::test]
async fn a_burst_of_jobs_wakes_one_taker_and_one_more_not_one_a_job() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (port, jobs) = channel(64);
    let polls = Arc::new(AtomicUsize::new(0));
    let (done, mut taken) = mpsc::unbounded_channel();
    for _ in 0..8 {
        let (jobs, polls, done) = (jobs.clone(), polls.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                let Some(j) = Polls(Box::pin(jobs.recv()), &polls).await else {
                    return;
                };
                let _ = done.send(j.seq);
            }
        });
    }
    tokio::task::yield_now().await; // every taker waits
    let waiting = polls.swap(0, Ordering::Relaxed);
    assert_eq!(waiting, 8, "each taker polled once, to wait");
    for seq in 0..32 {
        assert!(port.try_send(job(seq)).is_ok());
    }
    let mut seen = Vec::new();
    while seen.len() < 32 {
        seen.push(taken.recv().await.unwrap());
    }
    assert_eq!(seen, (0..32).collect::<Vec<_>>(), "in order");
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    // The woken taker takes all 32 back to back, and wakes one more (which finds them
    // taken): one poll a job taken, and two wake-ups, where one a job woke all eight.
    assert_eq!(polls.load(Ordering::Relaxed), 32 + 2);
}

#[tokio::test]
async fn a_job_left_behind_by_a_taker_that_waits_is_taken_by_another() {
    let (port, jobs) = channel(8);
    let (done, mut taken) = mpsc::unbounded_channel();
    let gate = Arc::new(tokio::sync::Notify::new());
    for taker in 0..2 {
        let (jobs, done, gate) = (jobs.clone(), done.clone(), gate.clone());
        tokio::spawn(async move {
            while let Some(j) = jobs.recv().await {
                let _ = done.send((taker, j.seq));
                if j.seq == 1 {
                    // A call that waits (for ever, here).
                    gate.notified().await;
                }
            }
        });
    }
    tokio::task::yield_now().await;
    assert!(port.try_send(job(1)).is_ok());
    assert!(port.try_send(job(2)).is_ok());
    let (first, one) = taken.recv().await.unwrap();
    let (second, two) = tokio::time::timeout(Duration::from_secs(5), taken.recv())
        .await
        .expect("the second job is taken while the first waits")
        .unwrap();
    assert_eq!((one, two), (1, 2));
    assert_ne!(first, second, "by the other taker");
    // One queued later, while the first taker still waits, is taken too.
    assert!(port.try_send(job(3)).is_ok());
    let (third, three) = tokio::time::timeout(Duration::from_secs(5), taken.recv())
        .await
        .expect("a job queued later is taken")
        .unwrap();
    assert_eq!((third, three), (second, 3));
}

#[tokio::test]
async fn a_cancelled_taker_passes_its_wake_up_on() {
    let (port, jobs) = channel(4);
    // Taker `a` waits first (polled once by hand), so the job's wake-up goes to it.
    let mut a = Box::pin(jobs.recv());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(a.as_mut().poll(&mut cx).is_pending(), "nothing queued yet");
    let b = tokio::spawn({
        let jobs = jobs.clone();
        async move { jobs.recv().await.map(|j| j.seq) }
    });
    tokio::task::yield_now().await; // `b` waits behind `a`
    assert!(port.try_send(job(7)).is_ok());
    // `a` is woken but dropped before it takes the job (a `select!` that went the
    // other way): its wake-up must reach `b`, or `b` would wait for ever.
    drop(a);
    let got = tokio::time::timeout(Duration::from_secs(5), b)
        .await
        .expect("the wake-up passed on to the other taker")
        .unwrap();
    assert_eq!(got, Some(7));
}
