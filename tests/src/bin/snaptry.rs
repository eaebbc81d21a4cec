//! scratch
use kestrel_api::RestoreOverrides;
use kestrel_sandbox::agent::AgentClient;
use kestrel_vmm::Vm;
use std::time::{Duration, Instant};
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let uds = std::path::PathBuf::from("/tmp/snaptry-clone.sock");
    let _ = std::fs::remove_file(&uds);
    let o = RestoreOverrides {
        name: Some("snapclone".into()),
        vsock_uds_path: Some(uds.clone()),
        ..Default::default()
    };
    let t = Instant::now();
    let vm = Vm::restore(&dir, &o).expect("restore");
    vm.start().expect("start");
    println!("started {:?}", t.elapsed());
    let mut a = AgentClient::connect(
        &uds,
        kestrel_agent_proto::AGENT_PORT,
        Duration::from_secs(60),
    )
    .expect("connect");
    println!("ping {:?} {:?}", a.ping(), t.elapsed());
    println!("time {:?} {:?}", a.set_time_now(), t.elapsed());
    let r = a.exec(&["/bin/sh", "-c", "cat /sys/devices/system/clocksource/clocksource0/current_clocksource /sys/devices/system/clocksource/clocksource0/available_clocksource; cat /proc/cmdline; adjtimex | grep time; dmesg | grep -i -E 'clock|tsc' | tail -20"]).expect("exec");
    println!("{} {:?}", r.stdout_str(), t.elapsed());
    for _ in 0..3 {
        let h = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let r = a
            .exec(&["/bin/sh", "-c", "adjtimex | grep time"])
            .expect("exec");
        let h2 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        println!(
            "host {h:.3}..{h2:.3} guest {}",
            r.stdout_str().replace('\n', " ")
        );
        std::thread::sleep(Duration::from_secs(5));
    }
    vm.stop();
}
