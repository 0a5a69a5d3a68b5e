/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shifter: the table of redirected connections of one namespace.
 */

#ifndef _SHIFTER_TABLE_H
#define _SHIFTER_TABLE_H

#include <linux/netfilter.h>
#include <linux/types.h>

struct nf_conn;
struct shifter_net;
struct shifter_table;

/*
 * A connection as the redirector sees it on its accepted socket: its peer
 * (the client, after any source NAT) and its own local address, that is
 * conntrack's reply tuple turned round.  IPv4 addresses sit in the first
 * word of the unions with the rest zero, so that the whole structure,
 * padding included, is hashed and compared as bytes: build it zeroed.
 */
struct shifter_key {
	union nf_inet_addr peer;
	union nf_inet_addr local;
	__be16 peer_port;
	__be16 local_port;
	u8 family;
	u8 zero[3];
};

/* What a look-up answers: the connection's original destination. */
struct shifter_dest {
	union nf_inet_addr addr;
	__be16 port;
};

int shifter_table_init(void);
void shifter_table_exit(void);

struct shifter_table *shifter_table_new(struct shifter_net *sn);
void shifter_table_free(struct shifter_table *table);

void shifter_table_record(struct shifter_table *table, const struct nf_conn *ct);
int shifter_table_lookup(struct shifter_table *table,
			 const struct shifter_key *key,
			 struct shifter_dest *dest);
unsigned int shifter_table_count(const struct shifter_table *table);

#endif /* _SHIFTER_TABLE_H */
