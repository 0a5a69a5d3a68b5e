/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * Shifter: the original destination of redirected TCP connections.
 *
 * The shifter module watches TCP SYNs to a set of destination ports before
 * NAT rewrites them, and remembers, per network namespace,
 *
 *	(family, source address, source port) -> (destination address, port)
 *
 * User space (the Shifter redirector) asks for the destination of an
 * accepted connection by its peer's address and port over the generic
 * netlink family below.  Every command needs CAP_NET_ADMIN in the network
 * namespace of the requesting socket, and only sees that namespace.
 *
 * Byte order: addresses are in network byte order, as in the packet;
 * ports and counters are in host byte order.
 *
 * Commands
 * --------
 *
 * SHIFTER_CMD_GET: look up one connection.
 *	Request:  SHIFTER_A_FAMILY, SHIFTER_A_SRC_ADDR, SHIFTER_A_SRC_PORT
 *	Reply:    SHIFTER_CMD_GET with SHIFTER_A_FAMILY, SHIFTER_A_SRC_ADDR,
 *	          SHIFTER_A_SRC_PORT, SHIFTER_A_DST_ADDR, SHIFTER_A_DST_PORT
 *	Errors:   -ENOENT when no entry exists (never seen, expired or
 *	          evicted); -EINVAL when an attribute is missing, or when
 *	          SHIFTER_A_SRC_ADDR is not 4 bytes long for AF_INET or 16 bytes
 *	          long for AF_INET6, or the family is neither.
 *
 * SHIFTER_CMD_STATS: read this namespace's counters.
 *	Request:  no attributes
 *	Reply:    SHIFTER_CMD_STATS with SHIFTER_A_STATS, a nest of
 *	          SHIFTER_STAT_* u64 attributes.
 *
 * SHIFTER_CMD_GET_PORTS: read this namespace's watched destination ports.
 *	Request:  no attributes
 *	Reply:    SHIFTER_CMD_GET_PORTS with SHIFTER_A_PORTS, a nest of
 *	          SHIFTER_A_PORTS_PORT u16 attributes (possibly empty).
 *
 * SHIFTER_CMD_SET_PORTS: replace this namespace's watched ports.
 *	Request:  SHIFTER_A_PORTS, a nest of 0 to SHIFTER_MAX_PORTS
 *	          SHIFTER_A_PORTS_PORT u16 attributes (port 0 is invalid).
 *	Reply:    none beyond the netlink ACK.
 *	Errors:   -EINVAL for a missing nest, a port 0, or too many ports.
 *
 * A new network namespace starts with the ports of the module parameter
 * "ports" (default: 443).
 */

#ifndef _UAPI_LINUX_SHIFTER_H
#define _UAPI_LINUX_SHIFTER_H

#define SHIFTER_GENL_NAME	"shifter"
#define SHIFTER_GENL_VERSION	1

/* The most destination ports one namespace may watch. */
#define SHIFTER_MAX_PORTS	64

enum shifter_cmd {
	SHIFTER_CMD_UNSPEC,
	SHIFTER_CMD_GET,
	SHIFTER_CMD_STATS,
	SHIFTER_CMD_GET_PORTS,
	SHIFTER_CMD_SET_PORTS,
	__SHIFTER_CMD_MAX
};
#define SHIFTER_CMD_MAX (__SHIFTER_CMD_MAX - 1)

enum shifter_attr {
	SHIFTER_A_UNSPEC,
	SHIFTER_A_FAMILY,	/* u8: AF_INET or AF_INET6 */
	SHIFTER_A_SRC_ADDR,	/* binary: 4 or 16 bytes, network order */
	SHIFTER_A_SRC_PORT,	/* u16 */
	SHIFTER_A_DST_ADDR,	/* binary: 4 or 16 bytes, network order */
	SHIFTER_A_DST_PORT,	/* u16 */
	SHIFTER_A_STATS,	/* nest of enum shifter_stat */
	SHIFTER_A_PORTS,	/* nest of enum shifter_ports_attr */
	SHIFTER_A_PAD,
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
	SHIFTER_STAT_INSERTS,	/* u64: SYNs recorded */
	SHIFTER_STAT_LOOKUPS,	/* u64: GET requests */
	SHIFTER_STAT_HITS,	/* u64: GET requests answered */
	SHIFTER_STAT_MISSES,	/* u64: GET requests answered -ENOENT */
	SHIFTER_STAT_EVICTIONS,	/* u64: entries dropped to respect the size bound */
	SHIFTER_STAT_EXPIRIES,	/* u64: entries dropped for age */
	SHIFTER_STAT_PAD,
	__SHIFTER_STAT_MAX
};
#define SHIFTER_STAT_MAX (__SHIFTER_STAT_MAX - 1)

#endif /* _UAPI_LINUX_SHIFTER_H */
