/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * Shifter: the original destination of redirected TCP connections.
 *
 * In each network namespace that enables it, the shifter module records
 * every new TCP connection to a watched destination port that destination
 * NAT (a REDIRECT or DNAT rule) sent to a local socket, as conntrack names
 * it once every NAT decision is made:
 *
 *	reply tuple (what the redirector's accepted socket sees: its peer
 *	and its local address)  ->  original tuple (where the client meant
 *	to go)
 *
 * and answers the redirector (Shifter) for exactly the connection it
 * accepted.  An entry answers only while conntrack still holds that very
 * connection (same reply tuple, same original tuple); it is dropped when
 * conntrack no longer does, or expiry_secs after the SYN.  A packet that
 * does not become a connection never changes an entry.
 *
 * Nothing is recorded in a namespace until it is enabled there
 * (SHIFTER_CMD_ENABLE, or the first SHIFTER_CMD_SET_PORTS).  The module is
 * never loaded on demand by a family look-up: load it explicitly.
 *
 * Every command is checked by the generic netlink core for CAP_NET_ADMIN
 * in the user namespace that owns the network namespace of the requesting
 * socket (GENL_UNS_ADMIN_PERM), and acts on that network namespace only.
 *
 * Tenancy: SHIFTER_CMD_ENABLE and SHIFTER_CMD_SET_PORTS also need
 * CAP_NET_ADMIN in the initial user namespace (-EPERM otherwise), unless
 * the module parameter "userns" is set.  Network namespaces owned by the
 * initial user namespace share max_entries_total entries, max_entries
 * each; those owned by any other user namespace (containers, unprivileged
 * users' namespaces) share a room of their own, max_entries_userns_total,
 * max_entries_userns each, so that they can never take the initial
 * namespace's room.  A namespace whose share is full evicts one of its own
 * entries for a new connection (see SHIFTER_STAT_EVICTED_*); one that has
 * none while its room is full records nothing (SHIFTER_STAT_FULL).
 * Every command refuses attributes that are not listed for it below
 * (-EINVAL, with an extended ACK message).
 *
 * Byte order: addresses are in network byte order; ports, the interface
 * index and counters are in host byte order.
 *
 * Commands
 * --------
 *
 * SHIFTER_CMD_GET: the original destination of one accepted connection.
 *	Request:  SHIFTER_A_FAMILY, SHIFTER_A_SRC_ADDR, SHIFTER_A_SRC_PORT
 *	          (the accepted socket's peer), SHIFTER_A_LOCAL_ADDR,
 *	          SHIFTER_A_LOCAL_PORT (the accepted socket's own address),
 *	          all required.  An IPv4 connection accepted on an IPv6
 *	          socket is asked for as AF_INET.
 *	Reply:    SHIFTER_CMD_GET with SHIFTER_A_FAMILY, SHIFTER_A_SRC_ADDR,
 *	          SHIFTER_A_SRC_PORT, SHIFTER_A_LOCAL_ADDR,
 *	          SHIFTER_A_LOCAL_PORT as asked, SHIFTER_A_DST_ADDR and
 *	          SHIFTER_A_DST_PORT (the original destination).
 *	Errors:   -ENOENT when there is no entry, or conntrack no longer
 *	          holds the connection it was recorded for; -ENOTUNIQ when
 *	          live connections in two conntrack zones share these two
 *	          ends (conntrack keeps reply tuples unique per zone only, and
 *	          the accepted socket names no zone), so the question cannot
 *	          name one connection; -EINVAL for a
 *	          missing attribute, a family other than AF_INET or AF_INET6,
 *	          or an address not 4 (AF_INET) or 16 (AF_INET6) bytes long;
 *	          -ERANGE for a port 0.
 *
 * SHIFTER_CMD_STATS: this namespace's counters.
 *	Request:  no attributes.
 *	Reply:    SHIFTER_CMD_STATS with SHIFTER_A_STATS, a nest of
 *	          SHIFTER_STAT_* u64 attributes.
 *
 * SHIFTER_CMD_GET_CONFIG: this namespace's settings.
 *	Request:  no attributes.
 *	Reply:    SHIFTER_CMD_GET_CONFIG with SHIFTER_A_ENABLED (u8, 0 or 1),
 *	          SHIFTER_A_IFINDEX (u32, 0 for every interface, 0xffffffff
 *	          for none once the interface named was removed: nothing is
 *	          recorded until ENABLE names one again) and
 *	          SHIFTER_A_PORTS, a nest of SHIFTER_A_PORTS_PORT u16
 *	          attributes (possibly empty).
 *
 * SHIFTER_CMD_SET_PORTS: replace this namespace's watched ports, and
 *	enable the namespace if it is not enabled yet.
 *	Request:  SHIFTER_A_PORTS, a nest of 0 to SHIFTER_MAX_PORTS
 *	          SHIFTER_A_PORTS_PORT u16 attributes, none 0.
 *	Reply:    none beyond the netlink ACK.
 *	Errors:   -EINVAL for a missing nest or too many ports; -ERANGE
 *	          for a port 0; -ENOMEM.
 *
 * SHIFTER_CMD_ENABLE: start recording in this namespace (or change its
 *	settings while it records).
 *	Request:  optional SHIFTER_A_PORTS (as for SET_PORTS; without it the
 *	          namespace keeps its ports, at first the module parameter
 *	          "ports"); optional SHIFTER_A_IFINDEX: record only
 *	          connections whose SYN arrived on this interface (0: any;
 *	          the loopback device for connections of local programs).
 *	Reply:    none beyond the netlink ACK.
 *	Errors:   -ENODEV for an interface index this namespace does not
 *	          have; -ERANGE for one above INT_MAX; -EINVAL and -ERANGE as
 *	          for SET_PORTS; -ENOMEM.
 *
 * SHIFTER_CMD_DISABLE: stop recording in this namespace and drop its
 *	entries; its ports and interface are kept.
 *	Request:  no attributes.
 *	Reply:    none beyond the netlink ACK.
 *
 * The family's version (CTRL_ATTR_VERSION) is SHIFTER_GENL_VERSION:
 * version 1 modules keyed entries on the client's address and port alone
 * and answered wrongly when NAT remapped a port; user space should refuse
 * them.
 */

#ifndef _UAPI_LINUX_SHIFTER_H
#define _UAPI_LINUX_SHIFTER_H

#define SHIFTER_GENL_NAME	"shifter"
#define SHIFTER_GENL_VERSION	2

/* The most destination ports one namespace may watch. */
#define SHIFTER_MAX_PORTS	64

enum shifter_cmd {
	SHIFTER_CMD_UNSPEC,
	SHIFTER_CMD_GET,
	SHIFTER_CMD_STATS,
	SHIFTER_CMD_GET_CONFIG,
	SHIFTER_CMD_SET_PORTS,
	SHIFTER_CMD_ENABLE,
	SHIFTER_CMD_DISABLE,
	__SHIFTER_CMD_MAX
};

#define SHIFTER_CMD_MAX (__SHIFTER_CMD_MAX - 1)

enum shifter_attr {
	SHIFTER_A_UNSPEC,
	SHIFTER_A_FAMILY,	/* u8: AF_INET or AF_INET6 */
	SHIFTER_A_SRC_ADDR,	/* binary: the client, as accepted */
	SHIFTER_A_SRC_PORT,	/* u16 */
	SHIFTER_A_DST_ADDR,	/* binary: the original destination */
	SHIFTER_A_DST_PORT,	/* u16 */
	SHIFTER_A_STATS,	/* nest of enum shifter_stat */
	SHIFTER_A_PORTS,	/* nest of enum shifter_ports_attr */
	SHIFTER_A_LOCAL_ADDR,	/* binary: the accepting socket's address */
	SHIFTER_A_LOCAL_PORT,	/* u16 */
	SHIFTER_A_ENABLED,	/* u8: 1 while the namespace records */
	SHIFTER_A_IFINDEX,	/* u32: the one interface recorded, or 0 */
	__SHIFTER_A_MAX
};

#define SHIFTER_A_MAX (__SHIFTER_A_MAX - 1)

enum shifter_ports_attr {
	SHIFTER_A_PORTS_UNSPEC,
	SHIFTER_A_PORTS_PORT,	/* u16, repeated */
	__SHIFTER_A_PORTS_MAX
};

#define SHIFTER_A_PORTS_MAX (__SHIFTER_A_PORTS_MAX - 1)

enum shifter_stat {
	SHIFTER_STAT_UNSPEC,
	SHIFTER_STAT_ENTRIES,	/* u64: entries in the table now */
	SHIFTER_STAT_INSERTS,	/* u64: connections recorded */
	SHIFTER_STAT_LOOKUPS,	/* u64: GET requests */
	SHIFTER_STAT_HITS,	/* u64: GET requests answered */
	SHIFTER_STAT_MISSES,	/* u64: GET requests answered -ENOENT */
	SHIFTER_STAT_EXPIRIES,	/* u64: entries dropped for age */
	SHIFTER_STAT_GONE,	/* u64: entries dropped: conntrack let go */
	SHIFTER_STAT_FULL,	/* u64: connections not recorded: no memory,
				 * or the room of all namespaces was taken
				 * by others */
	SHIFTER_STAT_PAD,
	SHIFTER_STAT_AMBIGUOUS,	/* u64: GET requests answered -ENOTUNIQ */
	SHIFTER_STAT_SKIPPED,	/* u64: SYNs not recorded: a live entry holds
				 * their key (conntrack drops them) */
	SHIFTER_STAT_EVICTED_GONE,	/* u64: entries evicted for room:
					 * conntrack had let go */
	SHIFTER_STAT_EVICTED_ANSWERED,	/* u64: ... already answered */
	SHIFTER_STAT_EVICTED_EARLY,	/* u64: ... not assured, or closing */
	SHIFTER_STAT_EVICTED_OLDEST,	/* u64: ... the oldest, none of those */
	__SHIFTER_STAT_MAX
};

#define SHIFTER_STAT_MAX (__SHIFTER_STAT_MAX - 1)

#endif /* _UAPI_LINUX_SHIFTER_H */
