//! What the benchmark learns from the operating system: which local processes serve an
//! address, how much CPU time and memory they (and this client) used, and which CPUs threads
//! run on. The one place that reads `/proc`: `wharf bench` and the peers in `bench/peers` use it.
//!
//! CPU time per request is the steadier measure of a server's efficiency on a small, shared
//! machine: it does not depend on how fast the client is. It is read from `/proc/<pid>/stat`
//! (utime + stime of every thread of the process).

use std::net::SocketAddr;
use std::time::Duration;

/// Reads the CPU time of a fixed set of processes.
pub struct CpuClock {
    pids: Vec<u32>,
}

impl CpuClock {
    pub fn new(pids: &[u32]) -> CpuClock {
        CpuClock {
            pids: pids.to_vec(),
        }
    }

    /// Total CPU time of the processes; `None` without processes or when one has exited.
    pub fn server(&self) -> Option<Duration> {
        if self.pids.is_empty() {
            return None;
        }
        let mut total = Duration::ZERO;
        for &pid in &self.pids {
            total += process_cpu(pid)?;
        }
        Some(total)
    }
}

/// utime + stime of a process and of its reaped children (an exec service's commands), from
/// `/proc/<pid>/stat`.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields are counted after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime and cstime are fields 14 to 17 of stat(5); after the name they are
    // the 12th to 15th.
    let mut ticks = 0u64;
    for field in fields.get(11..15)? {
        ticks += field.parse::<u64>().ok()?;
    }
    Some(Duration::from_secs_f64(
        ticks as f64 / clock_ticks_per_second(),
    ))
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/<pid>/status`); `None` when it has
/// exited or is not visible.
pub fn resident_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// CPU time (user + system) used so far by this process.
pub fn own_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and has no other effect.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Pins the calling thread to one CPU (best effort: a failure leaves it unpinned).
pub fn pin_current_thread(cpu: usize) {
    pin(0, &[cpu]);
}

/// Pins a thread or process (`0` = the calling thread) to `cpus`. Returns whether it worked.
pub fn pin(pid: libc::pid_t, cpus: &[usize]) -> bool {
    // SAFETY: the set is initialized by CPU_ZERO before use; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Raises the soft limit on open files to `want` (at most the hard limit), so that many
/// connections, here and in servers started from here, do not hit the usual 1024.
pub fn raise_fd_limit(want: u64) {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: as in `pin`; sched_getaffinity fills the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// The local processes that hold a socket listening on `addr` (every process sharing it:
/// nginx's workers, all of wharf's). Empty when the server is remote or not visible to us.
pub fn listening_pids(addr: SocketAddr) -> Vec<u32> {
    pids_holding(&listening_inodes(addr))
}

/// The local processes that hold a Unix-domain socket listening at `name` (a path, or `@name`
/// for the abstract namespace, as /proc/net/unix writes it).
pub fn unix_listening_pids(name: &str) -> Vec<u32> {
    pids_holding(&unix_listening_inodes(name))
}

/// Socket inodes listening at the Unix socket `name`, from /proc/net/unix (`St` 01, flag
/// `__SO_ACCEPTCON`).
fn unix_listening_inodes(name: &str) -> Vec<u64> {
    const ACCEPTCON: u32 = 0x10000;
    let Ok(text) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let listening = flags & ACCEPTCON != 0 && *f.get(4)? == "0001";
            (listening && *f.get(7)? == name).then(|| f.get(6)?.parse().ok())?
        })
        .collect()
}

/// The local processes holding one of the sockets `inodes`.
fn pids_holding(inodes: &[u64]) -> Vec<u32> {
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|target| {
                    let t = target
                        .to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?;
                    t.parse::<u64>().ok()
                })
                .is_some_and(|inode| inodes.contains(&inode))
        });
        if holds {
            pids.push(pid);
        }
    }
    pids
}

/// Socket inodes listening on `addr`'s port, on its address or a wildcard: TCP listeners from
/// /proc/net/tcp*, and unconnected (bound) UDP sockets from /proc/net/udp*.
fn listening_inodes(addr: SocketAddr) -> Vec<u64> {
    // TCP_LISTEN, and TCP_CLOSE: the state of a bound, unconnected UDP socket.
    const TABLES: [(&str, &str); 4] = [
        ("/proc/net/tcp", "0A"),
        ("/proc/net/tcp6", "0A"),
        ("/proc/net/udp", "07"),
        ("/proc/net/udp6", "07"),
    ];
    let mut inodes = Vec::new();
    for (table, listening) in TABLES {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let Some((ip_hex, port_hex)) = local.split_once(':') else {
                continue;
            };
            if *state != listening || u16::from_str_radix(port_hex, 16).ok() != Some(addr.port()) {
                continue;
            }
            let wildcard = ip_hex.bytes().all(|b| b == b'0');
            if wildcard || proc_net_ip_matches(ip_hex, addr.ip()) {
                if let Ok(inode) = inode.parse() {
                    inodes.push(inode);
                }
            }
        }
    }
    inodes
}

/// /proc/net/tcp writes addresses as 32-bit words in host byte order (little endian here).
fn proc_net_ip_matches(hex: &str, ip: std::net::IpAddr) -> bool {
    let words: Vec<u32> = (0..hex.len() / 8)
        .filter_map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .collect();
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match ip {
        std::net::IpAddr::V4(v4) => {
            bytes == v4.octets() || (bytes.len() == 16 && bytes[..] == v4.to_ipv6_mapped().octets())
        }
        std::net::IpAddr::V6(v6) => bytes == v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_process_listening_on_an_address_and_reads_its_cpu_time() {
        // This test process is excluded from the search, so the listener must be held by
        // another process: a `sleep` child inheriting the listening socket.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        // Make the fd inheritable, then let a child hold it.
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pids = listening_pids(addr);
        child.kill().unwrap();
        child.wait().unwrap();
        // (Another test spawning a child at the same moment could inherit it too.)
        assert!(pids.contains(&child.id()), "{pids:?}");
        assert!(process_cpu(child.id()).is_none(), "the child has exited");
        assert!(process_cpu(std::process::id()).is_some());
        assert!(resident_kib(child.id()).is_none(), "the child has exited");
        assert!(resident_kib(std::process::id()).is_some_and(|kib| kib > 0));
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(listening_pids(other.local_addr().unwrap()).is_empty());
        let path = std::env::temp_dir().join(format!("wharf-procstat-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(unix_listening_inodes(path.to_str().unwrap()).len(), 1);
        assert!(unix_listening_inodes("/nowhere.sock").is_empty());
        drop(unix);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn own_cpu_time_grows_with_work() {
        let before = own_cpu();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(own_cpu() > before);
    }

    #[test]
    fn allowed_cpus_is_not_empty() {
        assert!(!allowed_cpus().is_empty());
    }
}
