//! The guest-agent client's response parsing (`kestrel_sandbox::agent::AgentClient`): the fuzz
//! input is everything the "agent" ever sends, on the far end of a Unix socket pair, and the
//! client runs a few operations against it.
//!
//! | input bytes | use                                                                        |
//! |-------------|----------------------------------------------------------------------------|
//! | `[0]`       | control: bit 0 a 4 KiB response-line limit, bit 1 a 64 KiB read limit,    |
//! |             | bit 2 a read limit of 0, bit 3 a call timeout of 0 ms                      |
//! | `[1..5]`    | the operations, one byte each: low nibble which (ping, exec, exec with a   |
//! |             | timeout, read_file, read_file_range, sha256_file_range, call, meminfo,     |
//! |             | cpus, probe_memory, offline_memory, write_file, online_cpu, sync, ...),    |
//! |             | high nibble picks a length / offset from a table of edge values            |
//! | the rest    | the agent's responses (JSON lines, request ids count from 1), then EOF     |
//!
//! The client's requests are left unread in the socket buffer (a few hundred bytes per call).
//! Nothing is asserted beyond "no panic" and every call returning (the input is finite, so
//! every read ends at EOF at the latest; timeouts are short).

#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use kestrel_sandbox::agent::{AgentClient, ExecRequest};
use libfuzzer_sys::fuzz_target;

const EDGES: [u64; 16] = [
    0,
    1,
    2,
    3,
    4,
    5,
    100,
    4096,
    (4 << 20) - 1,
    4 << 20,
    16 << 20,
    u32::MAX as u64,
    1 << 62,
    u64::MAX / 4 * 3,
    u64::MAX - 1,
    u64::MAX,
];

fuzz_target!(|data: &[u8]| {
    kestrel_fuzz::ignore_sigpipe();
    let [control, o0, o1, o2, o3, responses @ ..] = data else {
        return;
    };
    let (client_end, mut agent_end) = UnixStream::pair().unwrap();
    // The whole input fits the socket buffer (inputs are at most 16 KiB).
    agent_end.write_all(responses).unwrap();
    agent_end.shutdown(Shutdown::Write).unwrap();

    let mut client = AgentClient::from_stream(client_end).unwrap();
    if control & 1 != 0 {
        client.set_max_response_line(4096);
    }
    if control & 2 != 0 {
        client.set_max_read_file(64 << 10);
    }
    if control & 4 != 0 {
        client.set_max_read_file(0);
    }
    client.set_call_timeout(Some(if control & 8 != 0 {
        Duration::ZERO
    } else {
        Duration::from_millis(200)
    }));

    for &op in [o0, o1, o2, o3] {
        let edge = EDGES[usize::from(op >> 4)];
        let _ = match op & 15 {
            0 => client.ping().map(drop),
            1 => client.exec(&["/bin/true"]).map(drop),
            2 => client
                .exec_with(
                    &ExecRequest::new(&["sh", "-c", "echo"])
                        .stdin(b"input".to_vec())
                        .timeout(Duration::from_millis(edge)),
                )
                .map(drop),
            3 => client.read_file("/etc/hostname").map(drop),
            4 => client.read_file_range("/f", edge, Some(edge)).map(drop),
            5 => client.read_file_range("/f", edge, None).map(drop),
            6 => client.sha256_file_range("/f", edge, Some(edge)).map(drop),
            7 => client.call("ping", serde_json::json!({})).map(drop),
            8 => client.meminfo().map(drop),
            9 => client.cpus().map(drop),
            10 => client.probe_memory(edge, edge).map(drop),
            11 => client.offline_memory(edge, edge).map(drop),
            12 => client
                .write_file("/f", b"data", Some(edge as u32))
                .map(drop),
            13 => client.online_cpu(edge as u32, op & 0x10 != 0).map(drop),
            14 => client.sync(),
            _ => client.sha256_file("/f").map(drop),
        };
    }
    drop(client);
    drop(agent_end);
});
