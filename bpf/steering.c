/* tlsgate connection steering: a BPF_PROG_TYPE_SK_REUSEPORT program that picks, for each
 * new TCP connection, which worker's listening socket of the SO_REUSEPORT group gets it.
 *
 * Rules of this program:
 * - Slot k of the socket array is worker k. An empty slot (a worker being replaced, or
 *   taken out by the supervisor) is never chosen while any other slot holds a socket.
 * - Policies (POLICY, fixed at compile time):
 *     least-loaded: two distinct random candidate slots; the one whose worker published the
 *       lower active-connection count goes first, the other second;
 *     hash: slot md->hash % N_SLOTS (a flow always lands on the same worker).
 *   When the chosen slot(s) cannot take the connection, the slots after the first one are
 *   tried in order; only when none can does the kernel's own reuseport hash decide.
 * - Migration (attach type BPF_SK_REUSEPORT_SELECT_OR_MIGRATE): when a listener closes,
 *   its queued connections and pending handshakes come here with md->migrating_sk set and
 *   are placed by the same policy. The closing listener is never picked: the kernel has
 *   already removed it from the socket array (bpf_sk_reuseport_detach() in
 *   reuseport_stop_listen_sock(), before any migration runs), so its slot is empty unless
 *   the supervisor put the replacement socket there.
 * - The program never returns SK_DROP: refusing a client is never better than letting the
 *   kernel hash pick a socket of the group.
 * - Every outcome is counted in a per-CPU array (atomic adds: a migration runs in process
 *   context and may be interrupted by the softirq that runs this program on the same CPU).
 *
 * Maps are created by tlsgate (bpf/steering.py) and passed in as fds, because bcc 0.26
 * does not turn a declared map into a map reference for bpf_sk_select_reuseport:
 *   SOCKS_FD     REUSEPORT_SOCKARRAY[N_SLOTS]  slot -> listening socket
 *   LOAD_FD      ARRAY[N_SLOTS] u64, mmapable  slot -> active connections, written by workers
 *   SELECTED_FD  PERCPU_ARRAY[N_SLOTS] u64     slot -> connections this program gave it
 *   OUTCOMES_FD  PERCPU_ARRAY[NUM_OUTCOMES]    enum outcome -> count
 */
#include <uapi/linux/bpf.h>

#define MAX_SLOTS 1024 /* upper bound of N_SLOTS; steering.py MAX_SLOTS must match */
#define MAX_PROBES (N_SLOTS - 1) /* slots tried after the first choice, at most */

#define POLICY_LEAST_LOADED 0
#define POLICY_HASH 1

#define ERR_EMPTY_SLOT (-2) /* -ENOENT from bpf_sk_select_reuseport: no socket in the slot */

#if !defined(N_SLOTS) || !defined(POLICY) || !defined(SOCKS_FD) || !defined(LOAD_FD) || \
    !defined(SELECTED_FD) || !defined(OUTCOMES_FD)
#error "compile through tlsgate.bpf.steering.Steering.load(), which defines the parameters"
#endif
#if N_SLOTS < 1 || N_SLOTS > MAX_SLOTS
#error "N_SLOTS must be within 1..MAX_SLOTS"
#endif
#if POLICY != POLICY_LEAST_LOADED && POLICY != POLICY_HASH
#error "unknown POLICY"
#endif

/* Keep in the order of steering.py OUTCOMES. */
enum outcome {
	OUTCOME_HIT,           /* the first choice took the connection */
	OUTCOME_SECOND_CHOICE, /* least-loaded: the first choice could not, the second did */
	OUTCOME_SCAN,          /* neither choice could; a later slot did */
	OUTCOME_EMPTY_SLOT,    /* a slot tried was empty (per slot tried, not per connection) */
	OUTCOME_SELECT_ERROR,  /* a slot tried holds a socket outside this reuseport group */
	OUTCOME_FALLBACK,      /* no slot could take it: the kernel's reuseport hash decides */
	OUTCOME_MIGRATE,       /* the run placed a connection of a closing listener */
	NUM_OUTCOMES,
};

#define MAP(fd) ((void *)bpf_pseudo_fd(1, fd))

static __always_inline void count(u32 outcome)
{
	u64 *value = bpf_map_lookup_elem(MAP(OUTCOMES_FD), &outcome);

	/* Cannot be NULL (outcome < NUM_OUTCOMES = max_entries); the verifier wants the check. */
	if (value)
		__sync_fetch_and_add(value, 1);
}

/* 0 when the slot's socket was selected; the failure is counted. */
static __always_inline int try_slot(struct sk_reuseport_md *md, u32 slot)
{
	long err = bpf_sk_select_reuseport(md, MAP(SOCKS_FD), &slot, 0);
	u64 *selected;

	if (err == 0) {
		selected = bpf_map_lookup_elem(MAP(SELECTED_FD), &slot);
		if (selected) /* cannot be NULL: slot < N_SLOTS = max_entries */
			__sync_fetch_and_add(selected, 1);
		return 0;
	}
	/* Empty: the supervisor cleared the slot, or the worker's socket closed. Other errors
	 * (-EBADFD, -EPROTOTYPE, -EAFNOSUPPORT): the socket in the slot belongs to another
	 * reuseport group (a supervisor bug). Either way the next slot is tried. */
	count(err == ERR_EMPTY_SLOT ? OUTCOME_EMPTY_SLOT : OUTCOME_SELECT_ERROR);
	return -1;
}

#if POLICY == POLICY_LEAST_LOADED
static __always_inline u64 load_of(u32 slot)
{
	u64 *load = bpf_map_lookup_elem(MAP(LOAD_FD), &slot);

	/* Cannot be NULL (slot < N_SLOTS = max_entries); the verifier wants the check. */
	return load ? *(volatile u64 *)load : 0;
}
#endif

int tlsgate_steer(struct sk_reuseport_md *md)
{
	u32 first, second = N_SLOTS; /* N_SLOTS: no second choice */
	u32 i, slot;

	if (md->migrating_sk)
		count(OUTCOME_MIGRATE);

#if POLICY == POLICY_HASH
	first = md->hash % N_SLOTS;
	if (try_slot(md, first) == 0) {
		count(OUTCOME_HIT);
		return SK_PASS;
	}
#elif N_SLOTS == 1
	first = 0;
	if (try_slot(md, first) == 0) {
		count(OUTCOME_HIT);
		return SK_PASS;
	}
#else
	{
		u32 random = bpf_get_prandom_u32();
		u32 a = random % N_SLOTS;
		/* A different slot, from the high half of the random word. */
		u32 b = (a + 1 + (random >> 16) % (N_SLOTS - 1)) % N_SLOTS;

		if (load_of(b) < load_of(a)) {
			first = b;
			second = a;
		} else {
			first = a;
			second = b;
		}
	}
	if (try_slot(md, first) == 0) {
		count(OUTCOME_HIT);
		return SK_PASS;
	}
	if (try_slot(md, second) == 0) {
		count(OUTCOME_SECOND_CHOICE);
		return SK_PASS;
	}
#endif

	/* The chosen slot(s) could not take it: any slot that can is better than the kernel
	 * hash, which may pick a socket whose slot was cleared. */
	for (i = 1; i <= MAX_PROBES; i++) {
		slot = (first + i) % N_SLOTS;
		if (slot == second)
			continue; /* already tried */
		if (try_slot(md, slot) == 0) {
			count(OUTCOME_SCAN);
			return SK_PASS;
		}
	}

	/* Fallback: no slot holds a socket of this group (every worker is being replaced, or
	 * the supervisor has not filled the array yet). SK_PASS without a selection lets the
	 * kernel pick by its reuseport hash among the group's listening sockets, so the client
	 * is still served; SK_DROP would refuse it. */
	count(OUTCOME_FALLBACK);
	return SK_PASS;
}
