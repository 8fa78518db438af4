//! A small classic-BPF seccomp filter, written by hand: the architecture must be the
//! native one (a 32-bit system call on x86_64 kills the process: its numbers would bypass
//! every check below), x32 system calls fail, `socket(2)` and `socketpair(2)` of any domain
//! but AF_UNIX fail with EACCES (so Python's `socket.create_connection` and TensorFlow's
//! network code get "Permission denied"), and so do `connect(2)` and a `sendto(2)` that names
//! an address: Landlock (up to ABI 7) does not confine unix sockets that have a path, and
//! a worker that could connect to /var/run/docker.sock or the system bus could escape; the
//! worker's own socket to the supervisor is connected before it starts. io_uring fails with
//! ENOSYS (it can open sockets without `socket(2)`). `ptrace`, `process_vm_readv`/`writev`
//! and `pidfd_getfd` fail with EACCES: no reaching into the supervisor or another worker.
//! Everything else is allowed.

use std::fmt;
use std::io;

// classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

// struct seccomp_data offsets.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
/// The low 32 bits of `args[0]` (an `int` domain); args start at 16.
#[cfg(target_endian = "little")]
const OFFSET_ARG0_LOW: u32 = 16;
#[cfg(target_endian = "big")]
const OFFSET_ARG0_LOW: u32 = 20;
/// The two halves of `args[4]` (sendto's destination address pointer).
const OFFSET_ARG4_FIRST: u32 = 16 + 4 * 8;
const OFFSET_ARG4_SECOND: u32 = 16 + 4 * 8 + 4;

#[cfg(target_arch = "x86_64")]
const NATIVE_ARCH: Option<u32> = Some(0xC000_003E); // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const NATIVE_ARCH: Option<u32> = Some(0xC000_00B7); // AUDIT_ARCH_AARCH64
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const NATIVE_ARCH: Option<u32> = None;

/// x32 system calls are x86_64 numbers with this bit set.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: Option<u32> = Some(0x4000_0000);
#[cfg(not(target_arch = "x86_64"))]
const X32_SYSCALL_BIT: Option<u32> = None;

const RET_ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const RET_KILL_PROCESS: u32 = libc::SECCOMP_RET_KILL_PROCESS;
const fn ret_errno(errno: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA)
}

/// Where a jump goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Next,
    Allow,
    Eacces,
    Enosys,
    Kill,
    CheckDomain,
    CheckDestination,
}

enum Step {
    Load(u32),
    Jump(u16, u32, Target, Target),
    Return(u32),
    Label(Target),
}

/// A compiled filter, installed in the child by `install`.
pub struct Filter {
    program: Box<[libc::sock_filter]>,
    denies_sockets: bool,
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filter")
            .field("instructions", &self.program.len())
            .field("denies_sockets", &self.denies_sockets)
            .finish()
    }
}

impl Filter {
    /// The filter for this architecture; `None` where the native audit architecture is not
    /// known here (neither x86_64 nor aarch64). `deny_sockets`: refuse every socket domain
    /// but AF_UNIX.
    pub fn new(deny_sockets: bool) -> Option<Filter> {
        let arch = NATIVE_ARCH?;
        let mut steps = vec![
            Step::Load(OFFSET_ARCH),
            Step::Jump(JEQ_K, arch, Target::Next, Target::Kill),
            Step::Load(OFFSET_NR),
        ];
        if let Some(bit) = X32_SYSCALL_BIT {
            steps.push(Step::Jump(JGE_K, bit, Target::Enosys, Target::Next));
        }
        if deny_sockets {
            for nr in [libc::SYS_socket, libc::SYS_socketpair] {
                steps.push(Step::Jump(
                    JEQ_K,
                    nr as u32,
                    Target::CheckDomain,
                    Target::Next,
                ));
            }
            steps.extend([
                Step::Jump(
                    JEQ_K,
                    libc::SYS_connect as u32,
                    Target::Eacces,
                    Target::Next,
                ),
                Step::Jump(
                    JEQ_K,
                    libc::SYS_sendto as u32,
                    Target::CheckDestination,
                    Target::Next,
                ),
            ]);
        }
        for nr in [
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
        ] {
            steps.push(Step::Jump(JEQ_K, nr as u32, Target::Enosys, Target::Next));
        }
        // Reaching into another process: a worker shares the daemon's uid unless
        // workers.user is set, and without Landlock (or where Yama allows it) nothing else
        // would stop it reading the supervisor's memory (its tokens, every session).
        for nr in [
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_pidfd_getfd,
        ] {
            steps.push(Step::Jump(JEQ_K, nr as u32, Target::Eacces, Target::Next));
        }
        steps.push(Step::Return(RET_ALLOW));
        if deny_sockets {
            steps.extend([
                Step::Label(Target::CheckDomain),
                Step::Load(OFFSET_ARG0_LOW),
                Step::Jump(JEQ_K, libc::AF_UNIX as u32, Target::Allow, Target::Eacces),
                // sendto(fd, buf, len, flags, NULL, 0) only: both halves of the pointer zero.
                Step::Label(Target::CheckDestination),
                Step::Load(OFFSET_ARG4_FIRST),
                Step::Jump(JEQ_K, 0, Target::Next, Target::Eacces),
                Step::Load(OFFSET_ARG4_SECOND),
                Step::Jump(JEQ_K, 0, Target::Allow, Target::Eacces),
            ]);
        }
        steps.extend([
            Step::Label(Target::Allow),
            Step::Return(RET_ALLOW),
            Step::Label(Target::Eacces),
            Step::Return(ret_errno(libc::EACCES)),
            Step::Label(Target::Enosys),
            Step::Return(ret_errno(libc::ENOSYS)),
            Step::Label(Target::Kill),
            Step::Return(RET_KILL_PROCESS),
        ]);
        Some(Filter {
            program: assemble(&steps).into_boxed_slice(),
            denies_sockets: deny_sockets,
        })
    }

    /// Installs the filter on the calling thread (the forked child has one). Needs
    /// no_new_privs or CAP_SYS_ADMIN. Async-signal-safe: the program was built beforehand;
    /// this makes one system call.
    pub fn install(&self) -> io::Result<()> {
        let program = libc::sock_fprog {
            len: self.program.len() as u16,
            filter: self.program.as_ptr().cast_mut(),
        };
        // SAFETY: `program` points at `len` valid instructions that outlive the call (the
        // kernel copies them).
        let result = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &program as *const libc::sock_fprog,
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Resolves labels into classic BPF's forward jump offsets.
fn assemble(steps: &[Step]) -> Vec<libc::sock_filter> {
    let mut at = Vec::new();
    let mut index = 0usize;
    for step in steps {
        match step {
            Step::Label(target) => at.push((*target, index)),
            _ => index += 1,
        }
    }
    let position = |target: Target| {
        at.iter()
            .find(|(label, _)| *label == target)
            .map(|(_, index)| *index)
            .expect("every jump target has a label")
    };
    let mut program = Vec::with_capacity(index);
    for step in steps {
        let here = program.len();
        let offset = |target: Target| -> u8 {
            match target {
                Target::Next => 0,
                target => u8::try_from(position(target) - here - 1).expect("a short jump"),
            }
        };
        match *step {
            Step::Label(_) => continue,
            Step::Load(offset) => program.push(instruction(LD_W_ABS, 0, 0, offset)),
            Step::Return(value) => program.push(instruction(RET_K, 0, 0, value)),
            Step::Jump(code, value, jt, jf) => {
                program.push(instruction(code, offset(jt), offset(jf), value))
            }
        }
    }
    program
}

fn instruction(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        for deny in [false, true] {
            let filter = Filter::new(deny).expect("x86_64 or aarch64");
            let program = &filter.program;
            for (index, insn) in program.iter().enumerate() {
                if insn.code == JEQ_K || insn.code == JGE_K {
                    for offset in [insn.jt, insn.jf] {
                        assert!(index + 1 + (offset as usize) < program.len());
                    }
                }
            }
            assert_eq!(program.last().map(|insn| insn.code), Some(RET_K));
        }
    }
}
