/* LD_PRELOAD shim for OpenSSL clients (wrk, h2load): every connection a full handshake.
 *
 * wrk keeps the SSL object between connections (SSL_shutdown + SSL_clear keep the session)
 * and h2load hands a saved session to SSL_set_session: both resume by default, which would
 * flatter a proxy that resumes. This shim:
 *   - ignores SSL_set_session(s, sess) for a non-NULL sess (reports success);
 *   - drops whatever session an SSL object still holds before its handshake starts
 *     (SSL_connect / SSL_do_handshake while SSL_in_before), so no ticket or session id is
 *     offered;
 *   - with TLSGATE_SNI_NAMES=N (N > 0), rewrites each SNI "host" to "n<i>.host",
 *     i = 0, 1, ... N-1, 0, ... (one counter per process): a distinct-name storm from a client
 *     that sends one name.
 * With TLSGATE_RESUME=1 only the SNI rewrite is active (resumption as the client does it).
 * It needs no OpenSSL headers: the few types are opaque and the real functions come from
 * dlsym(RTLD_NEXT). Built at run time by tlsgate.loadtest.shim with the system cc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;

#define SSL_CTRL_SET_TLSEXT_HOSTNAME 55
#define MAX_NAME 256

static int (*real_set_session)(SSL *, SSL_SESSION *);
static int (*real_connect)(SSL *);
static int (*real_do_handshake)(SSL *);
static int (*real_in_before)(const SSL *);
static long (*real_ctrl)(SSL *, int, long, void *);
static int resume_allowed;
static unsigned long sni_names;
static unsigned long sni_counter;

__attribute__((constructor)) static void shim_init(void) {
    real_set_session = (int (*)(SSL *, SSL_SESSION *))dlsym(RTLD_NEXT, "SSL_set_session");
    real_connect = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_connect");
    real_do_handshake = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_do_handshake");
    real_in_before = (int (*)(const SSL *))dlsym(RTLD_NEXT, "SSL_in_before");
    real_ctrl = (long (*)(SSL *, int, long, void *))dlsym(RTLD_NEXT, "SSL_ctrl");
    const char *resume = getenv("TLSGATE_RESUME");
    resume_allowed = resume != NULL && strcmp(resume, "1") == 0;
    const char *names = getenv("TLSGATE_SNI_NAMES");
    sni_names = names != NULL ? strtoul(names, NULL, 10) : 0;
}

static void forget_session(SSL *s) {
    if (!resume_allowed && real_in_before != NULL && real_set_session != NULL &&
        real_in_before(s))
        real_set_session(s, NULL);
}

int SSL_set_session(SSL *s, SSL_SESSION *sess) {
    if (!resume_allowed && sess != NULL)
        return 1;
    return real_set_session(s, sess);
}

int SSL_connect(SSL *s) {
    forget_session(s);
    return real_connect(s);
}

int SSL_do_handshake(SSL *s) {
    forget_session(s);
    return real_do_handshake(s);
}

long SSL_ctrl(SSL *s, int cmd, long larg, void *parg) {
    if (cmd == SSL_CTRL_SET_TLSEXT_HOSTNAME && sni_names > 0 && parg != NULL) {
        char name[MAX_NAME];
        unsigned long i = __atomic_fetch_add(&sni_counter, 1, __ATOMIC_RELAXED) % sni_names;
        int n = snprintf(name, sizeof name, "n%lu.%s", i, (const char *)parg);
        if (n > 0 && (size_t)n < sizeof name)
            return real_ctrl(s, cmd, larg, name);
    }
    return real_ctrl(s, cmd, larg, parg);
}
