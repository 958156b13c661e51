/* The hot loops of the audit hash chain, in C: verification (verify_rows) and sealing
 * (link_hashes). klm_chainlink.reference holds the same functions in Python (the
 * specification, and the fallback when this module is not built); tests/test_chainlink.py
 * checks that both give the same answer on every input.
 *
 * A binary COPY row as the audit store streams it (postgres_store._CHAIN_COPY):
 *   int16 field count | int32 n | prev_hash(32) || uint64_be(sequence) || canonical (n bytes)
 *                     | int32 32 | hash(32)
 * and a link holds when prev_hash is the hash the row before ended on, sequence is the next
 * one, and hash = SHA-256(prev_hash || uint64_be(sequence) || canonical).
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED /* SHA256(): no provider look-up per call */
#include <Python.h>
#include <openssl/sha.h>
#include <stdint.h>
#include <string.h>

enum { END = 0, REACHED = 1, BAD = 2 };

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t be64(const unsigned char *p) {
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

/* Check rows from *offset on; stop after the row of sequence `last`, at the first row not
 * wholly before `end`, or at a row that does not hold (left at *offset). */
static int walk(const unsigned char *data, Py_ssize_t *offset, Py_ssize_t end,
                unsigned long long *expected, unsigned char prev[32], unsigned long long last) {
    unsigned char digest[SHA256_DIGEST_LENGTH];
    Py_ssize_t at = *offset;
    unsigned long long next = *expected;
    int status = END;
    while (at + 6 <= end) {
        Py_ssize_t body = at + 6;
        Py_ssize_t size = (int32_t)be32(data + at + 2);
        Py_ssize_t stop = body + size;
        if (stop + 36 > end)
            break; /* the row goes on in the next piece */
        if (size < 40 || memcmp(data + body, prev, 32) != 0 || be64(data + body + 32) != next
            || be32(data + stop) != 32) {
            status = BAD;
            break;
        }
        SHA256(data + body, (size_t)size, digest);
        if (memcmp(digest, data + stop + 4, 32) != 0) {
            status = BAD;
            break;
        }
        memcpy(prev, digest, 32);
        next += 1;
        at = stop + 36;
        if (next > last) {
            status = REACHED;
            break;
        }
    }
    *offset = at;
    *expected = next;
    return status;
}

/* "O&" converter: a Python int in [0, 2**64), else OverflowError ("K" would wrap silently) */
static int u64(PyObject *o, void *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    *(unsigned long long *)out = v;
    return 1;
}

static PyObject *verify_rows(PyObject *self, PyObject *args) {
    Py_buffer data, prev_in;
    Py_ssize_t offset, end;
    unsigned long long expected, last;
    unsigned char prev[32];
    int status;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnO&y*O&", &data, &offset, &end, u64, &expected,
                          &prev_in, u64, &last))
        return NULL;
    if (prev_in.len != 32 || offset < 0 || end < offset || end > data.len) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&prev_in);
        PyErr_SetString(PyExc_ValueError,
                        "prev must be 32 bytes and 0 <= offset <= end <= len(data)");
        return NULL;
    }
    memcpy(prev, prev_in.buf, 32);
    PyBuffer_Release(&prev_in);
    Py_BEGIN_ALLOW_THREADS
    status = walk((const unsigned char *)data.buf, &offset, end, &expected, prev, last);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return Py_BuildValue("nKy#i", offset, expected, (const char *)prev, (Py_ssize_t)32, status);
}

/* link_hashes(prev, sequence, canonicals): the hashes of the links that follow `prev`, the
 * first numbered `sequence`: SHA-256(prev || uint64_be(sequence) || canonical), chained. */
static PyObject *link_hashes(PyObject *self, PyObject *args) {
    Py_buffer prev_in;
    unsigned long long sequence;
    PyObject *canonicals, *items, *out;
    unsigned char prev[32], number[8];
    Py_ssize_t count, i;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*O&O", &prev_in, u64, &sequence, &canonicals))
        return NULL;
    if (prev_in.len != 32) {
        PyBuffer_Release(&prev_in);
        PyErr_SetString(PyExc_ValueError, "prev must be 32 bytes");
        return NULL;
    }
    memcpy(prev, prev_in.buf, 32);
    PyBuffer_Release(&prev_in);
    items = PySequence_Fast(canonicals, "canonicals must be a sequence of bytes");
    if (items == NULL)
        return NULL;
    count = PySequence_Fast_GET_SIZE(items);
    out = PyList_New(count);
    for (i = 0; out != NULL && i < count; i++, sequence++) {
        PyObject *canonical = PySequence_Fast_GET_ITEM(items, i), *digest;
        SHA256_CTX link;
        int b;
        if (!PyBytes_Check(canonical)) {
            PyErr_SetString(PyExc_TypeError, "canonicals must be a sequence of bytes");
            Py_CLEAR(out);
            break;
        }
        if (sequence == 0) {
            PyErr_SetString(PyExc_ValueError, "sequence must be a positive 64-bit integer");
            Py_CLEAR(out);
            break;
        }
        for (b = 0; b < 8; b++)
            number[b] = (unsigned char)(sequence >> (56 - 8 * b));
        SHA256_Init(&link);
        SHA256_Update(&link, prev, 32);
        SHA256_Update(&link, number, 8);
        SHA256_Update(&link, PyBytes_AS_STRING(canonical), (size_t)PyBytes_GET_SIZE(canonical));
        SHA256_Final(prev, &link);
        digest = PyBytes_FromStringAndSize((const char *)prev, 32);
        if (digest == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, digest);
    }
    Py_DECREF(items);
    return out;
}

static PyMethodDef methods[] = {
    {"link_hashes", link_hashes, METH_VARARGS,
     "link_hashes(prev, sequence, canonicals) -> [hash of each link, chained]"},
    {"verify_rows", verify_rows, METH_VARARGS,
     "verify_rows(data, offset, end, expected, prev, last) -> (offset, expected, prev, status)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "klm_chainlink._native",
    "The audit-chain verification loop in C (see klm_chainlink.reference).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
