//! The event loop's epoll set follows the server's connections even when
//! the process forks: a child that holds a copy of a connection the server
//! closed (as any child does between its fork and its exec) must not keep
//! that connection in the set.

use std::time::Duration;

use integration_tests::*;

/// How long the forked child holds every fd of this process.
const HOLD: Duration = Duration::from_millis(900);
/// The CPU time of the loop thread is measured over this window.
const WINDOW: Duration = Duration::from_millis(400);

#[test]
fn a_connection_closed_while_a_forked_child_holds_it_does_not_wake_the_loop() {
    let s = spawn_server();
    let first = RawClient::connect_negotiated(s.path());
    let client_end = first.fd();
    // SAFETY: the child only sleeps and exits (async-signal-safe calls);
    // it shares nothing but the inherited fds.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above. The child lets go of the client's end (which
        // would keep the client there), not of the server's.
        unsafe {
            libc::close(client_end);
            libc::usleep(HOLD.as_micros() as libc::useconds_t);
            libc::_exit(0);
        }
    }
    assert!(pid > 0, "fork failed");
    // The client goes; the server closes its end, which the child still
    // holds: the socket lives on, hung up, for as long as the child does.
    drop(first);
    std::thread::sleep(Duration::from_millis(100));

    let cpu = s.loop_cpu_time();
    std::thread::sleep(WINDOW);
    let used = s.loop_cpu_time() - cpu;
    // A registration left behind would report the hang-up on every wait.
    assert!(used < WINDOW / 8, "loop used {used:?} of {WINDOW:?}");
    // And the next client is served meanwhile.
    let mut second = RawClient::connect_negotiated(s.path());
    second.ping();

    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    second.ping();
}

#[test]
fn a_client_that_half_closes_without_reading_its_replies_does_not_wake_the_loop() {
    let s = spawn_server();
    let mut c = RawClient::connect_negotiated(s.path());
    // More than the 4 MiB of replies the server queues before it stops
    // reading, none of them read.
    for _ in 0..1200 {
        let payload = payload::region_access(0, 0, 4096, &[]);
        c.send(proto::cmd::REGION_READ, 0, &payload, &[]);
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: shuts down the writing half of our own socket.
    assert_eq!(unsafe { libc::shutdown(c.fd(), libc::SHUT_WR) }, 0);
    std::thread::sleep(Duration::from_millis(100));

    let cpu = s.loop_cpu_time();
    std::thread::sleep(WINDOW);
    let used = s.loop_cpu_time() - cpu;
    // The peer's half-close must not be reported on every wait while the
    // server does not read.
    assert!(used < WINDOW / 8, "loop used {used:?} of {WINDOW:?}");
    // The server is not stuck on it: the next client is served once this
    // one is gone.
    drop(c);
    let mut next = RawClient::connect_negotiated(s.path());
    next.ping();
}
