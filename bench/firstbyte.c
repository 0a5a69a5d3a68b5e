// SPDX-License-Identifier: MIT
/*
 * Connect-to-first-byte latency: COUNT sequential connections to
 * HOST:PORT, each sending one "Connection: close" GET and reading the
 * answer to the end.  Prints, one a line, the nanoseconds from just
 * before connect() to the return of the first read that got bytes, or
 * "E <reason>" for a connection that failed.  Stops after COUNT
 * connections or SECONDS seconds, whichever comes first.
 *
 *   firstbyte HOST PORT COUNT SECONDS
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static const char *one(const struct sockaddr_in *addr, const char *request,
		       long long *elapsed)
{
	struct timeval timeout = { .tv_sec = 5 };
	char buf[16384];
	long long start;
	ssize_t n;
	int fd, one = 1;

	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return strerror(errno);
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	start = now_ns();
	if (connect(fd, (const struct sockaddr *)addr, sizeof(*addr)) < 0)
		goto fail;
	if (send(fd, request, strlen(request), 0) < 0)
		goto fail;
	n = read(fd, buf, sizeof(buf));
	*elapsed = now_ns() - start;
	if (n <= 0) {
		close(fd);
		return n == 0 ? "closed before answering" : strerror(errno);
	}
	while ((n = read(fd, buf, sizeof(buf))) > 0)
		;
	close(fd);
	return n < 0 ? strerror(errno) : NULL;
fail:
	close(fd);
	return strerror(errno);
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	char request[256];
	long long deadline, elapsed;
	long count, i;
	const char *error;

	if (argc != 5 || inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
		fprintf(stderr, "usage: %s IPV4 PORT COUNT SECONDS\n", argv[0]);
		return 2;
	}
	addr.sin_port = htons(atoi(argv[2]));
	count = atol(argv[3]);
	deadline = now_ns() + (long long)(atof(argv[4]) * 1e9);
	snprintf(request, sizeof(request),
		 "GET /index.html HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", argv[1]);
	for (i = 0; i < count && now_ns() < deadline; i++) {
		elapsed = 0;
		error = one(&addr, request, &elapsed);
		if (error)
			printf("E %s\n", error);
		else
			printf("%lld\n", elapsed);
	}
	return 0;
}
