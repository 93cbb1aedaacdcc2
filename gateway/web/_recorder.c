/* The request log's and request metrics' recorder, in C: what a finished
 * request leaves behind, kept as numbers, short copies and references to its
 * strings until the next drain, and the drain's two busy parts: the text log lines,
 * and the tallies of a batch of appends.
 *
 * gateway/web/recorder.py is the same recorder in Python, and the reference:
 * Telemetry uses this one when it is built (an optional extension: without a
 * compiler the gateway runs the Python one), and tests/unit/test_recorder.py
 * checks that both give the same lines, tallies and columns for the same
 * requests.
 *
 * Times are CLOCK_MONOTONIC nanoseconds, the clock of time.perf_counter_ns
 * on Linux; ``now()`` reads it here.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define CLIENT_CLOSED 499

/* A short ASCII str kept as a copy, so that the request's own object is freed
 * with the request (a batch holding thousands of them costs the request path
 * more than copying their few bytes), or a reference when it does not fit. */
#define ID_SIZE 48
#define DECLARED_SIZE 20
#define DECLARED_DIGITS_MAX 19 /* more: logged and counted as 0 */
#define METHOD_LOG_MAX 32      /* more characters: the first ones, then "..." */

typedef struct {
    PyObject *object;  /* the str itself, when not copied; else NULL */
    int length;        /* -1: None; else the copy's length */
} Text;

typedef struct {
    int64_t start;
    int64_t end;
    int64_t sent;
    PyObject *method;  /* str (a shared one, see shared()) */
    PyObject *path;    /* str (the record before's when equal, see same()) */
    PyObject *query;   /* str, or NULL for none (the usual case) */
    PyObject *live;    /* str, or NULL for none */
    Text request_id;
    Text declared;     /* Content-Length as sent */
    int status;
    char request_id_text[ID_SIZE];
    char declared_text[DECLARED_SIZE];
} Record;

/* Method strings the records share: a method seen before stands in for each
 * request's equal copy. Bounded (at most SHARED_MAX strings of at most
 * SHARED_LENGTH_MAX characters); emptied when full. Paths are not looked up
 * there: with many streams that lookup missed the CPU caches on nearly every
 * request, and cost more than keeping the request's own path. */
#define SHARED_MAX 4096
#define SHARED_LENGTH_MAX 256

/* A logged target takes at most this many bytes JSON-quoted (recorder.py's
 * TARGET_MAX_BYTES; tests/unit/test_recorder.py checks that they agree). */
#define TARGET_MAX_BYTES 2048

#define ID_PREFIX_MAX 32

#define STAMP_LENGTH 24 /* 2026-12-07T07:17:28.492Z */

typedef struct {
    PyObject_HEAD
    Record *records;
    Py_ssize_t size;
    Py_ssize_t capacity;
    Py_ssize_t full;      /* add() says "drain now" at this many */
    PyObject *shared;     /* dict: method -> the equal str records keep */
    PyObject *id_prefix;  /* str: new_id()'s prefix (ASCII, at most ID_PREFIX_MAX) */
    uint64_t ids_made;    /* new_id()'s counter */
    int ids;              /* begin() gives responses their request id */
    int id_prefix_length;
    char id_text[ID_PREFIX_MAX + 24]; /* the prefix, then the counter's digits */
    PyObject *quoted;     /* dict: target -> its JSON-quoted form */
    PyObject *target_of;  /* callable (path, query) -> the quoted target */
    int64_t offset_ms;    /* wall clock minus monotonic clock, milliseconds */
    int64_t millis;       /* the wall-clock millisecond whose text is in stamp */
    int64_t second;       /* the wall-clock second whose text is in stamp */
    char stamp[32];       /* "YYYY-MM-DDTHH:MM:SS.mmmZ" */
} Recorder;

static int64_t
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static PyObject *
now(PyObject *module, PyObject *unused)
{
    return PyLong_FromLongLong(monotonic_ns());
}

static int64_t
floordiv(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

/* -- recording ---------------------------------------------------------------- */

/* An int as int64: PyLong_AsLongLong takes a slow, general path for anything
 * past 2**30, as every clock reading is; PyLong_AsLong does not. */
static int64_t
as_int64(PyObject *value)
{
#if LONG_MAX == INT64_MAX
    return PyLong_AsLong(value);
#else
    return PyLong_AsLongLong(value);
#endif
}

static void
record_clear(Record *r)
{
    Py_CLEAR(r->method);
    Py_CLEAR(r->path);
    Py_CLEAR(r->query);
    Py_CLEAR(r->live);
    Py_CLEAR(r->request_id.object);
    Py_CLEAR(r->declared.object);
}

/* value (str or None) into text: copied when short ASCII, else referenced. */
static void
keep_text(Text *text, char *copy, int size, PyObject *value)
{
    text->object = NULL;
    if (value == Py_None) {
        text->length = -1;
    }
    else if (PyUnicode_IS_ASCII(value) && PyUnicode_GET_LENGTH(value) <= size) {
        text->length = (int)PyUnicode_GET_LENGTH(value);
        memcpy(copy, PyUnicode_DATA(value), text->length);
    }
    else {
        text->length = 0;
        text->object = Py_NewRef(value);
    }
}

static int
same_str(PyObject *a, PyObject *b)
{
    Py_ssize_t length = PyUnicode_GET_LENGTH(a);
    return a == b || (length == PyUnicode_GET_LENGTH(b) && PyUnicode_KIND(a) == PyUnicode_KIND(b) &&
                      memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), length * PyUnicode_KIND(a)) == 0);
}

/* The str to keep for value: the record before's when equal (a busy
 * stream's appends follow each other, and the drain then makes their line's
 * middle once), else value itself. */
static PyObject *
same(PyObject *value, PyObject *previous)
{
    return Py_NewRef(previous != NULL && same_str(previous, value) ? previous : value);
}

/* A method to keep: the record before's when equal, else the shared equal one. */
static PyObject *
shared(Recorder *self, PyObject *value, PyObject *previous)
{
    if (previous != NULL && same_str(previous, value))
        return Py_NewRef(previous);
    PyObject *found = PyDict_GetItemWithError(self->shared, value);
    if (found != NULL)
        return Py_NewRef(found);
    if (PyErr_Occurred())
        PyErr_Clear(); /* (a str always hashes) */
    else if (PyDict_GET_SIZE(self->shared) < SHARED_MAX &&
             PyUnicode_GET_LENGTH(value) <= SHARED_LENGTH_MAX &&
             PyDict_SetItem(self->shared, value, value) < 0)
        PyErr_Clear(); /* not shared: kept as it is */
    return Py_NewRef(value);
}

static int
check_str(PyObject *value, const char *what)
{
    if (!PyUnicode_CheckExact(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be str", what);
        return -1;
    }
    return 0;
}

/* -- the request and the response, read where they keep their fields ----------- */

/* gateway/web/request.py's Request and Response keep what begin() and add()
 * read and write in __slots__: layout() finds each slot's offset once, and the
 * request path then reads and writes them there, without a lookup. */
enum { REQ_METHOD, REQ_PATH, REQ_HEADERS, REQ_QUERY, REQ_SLOTS };
enum { RES_STATUS, RES_SENT, RES_REQUEST_ID, RES_ID_LINE, RES_START, RES_QUERY, RES_LIVE, RES_SLOTS };
static const char *request_slots[REQ_SLOTS] = {"method", "_path", "_headers", "query_string"};
static const char *response_slots[RES_SLOTS] = {"status", "sent",  "request_id", "id_line",
                                                "start",  "query", "live"};
#define REQUEST_ID_HEADER "x-request-id" /* (request.py's REQUEST_ID_HEADER) */
static PyTypeObject *request_type, *response_type;
static Py_ssize_t request_offsets[REQ_SLOTS], response_offsets[RES_SLOTS];
static PyObject *str_request_id_header, *str_content_length, *str_get, *str_loggable_path,
    *str_live;

static int
slot_offsets(PyTypeObject *type, const char **names, Py_ssize_t *offsets, int count)
{
    for (int i = 0; i < count; i++) {
        PyObject *descr = PyObject_GetAttrString((PyObject *)type, names[i]);
        if (descr == NULL)
            return -1;
        int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
                 ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
        if (ok)
            offsets[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_DECREF(descr);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s.%s is not a slot", type->tp_name, names[i]);
            return -1;
        }
    }
    return 0;
}

/* layout(Request, Response): where their fields are (once, at import). */
static PyObject *
layout(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyType_Check(args[0]) || !PyType_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "layout(Request, Response)");
        return NULL;
    }
    PyTypeObject *request = (PyTypeObject *)args[0], *response = (PyTypeObject *)args[1];
    if (slot_offsets(request, request_slots, request_offsets, REQ_SLOTS) < 0 ||
        slot_offsets(response, response_slots, response_offsets, RES_SLOTS) < 0)
        return NULL;
    Py_XSETREF(request_type, (PyTypeObject *)Py_NewRef(request));
    Py_XSETREF(response_type, (PyTypeObject *)Py_NewRef(response));
    Py_RETURN_NONE;
}

/* A slot's value (borrowed; NULL when unset). */
static PyObject *
slot(PyObject *object, Py_ssize_t offset)
{
    return *(PyObject **)((char *)object + offset);
}

/* A response's slot, to set (with Py_XSETREF). */
#define RES_SLOT(res, name) (*(PyObject **)((char *)(res) + response_offsets[name]))

/* begin()'s and add()'s arguments: a Request and a Response, where layout()
 * found their slots. */
static int
check_pair(const char *name, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 2 arguments (%zd given)", name, nargs);
        return -1;
    }
    PyObject *req = args[0], *res = args[1];
    if (request_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "layout() was not called");
        return -1;
    }
    if (!PyObject_TypeCheck(req, request_type) || !PyObject_TypeCheck(res, response_type)) {
        PyErr_Format(PyExc_TypeError, "expected a %s and a %s", request_type->tp_name,
                     response_type->tp_name);
        return -1;
    }
    return 0;
}

/* The request's header name (lower case): a str, or None (a new reference).
 * Its headers are a dict, or (RSGI) a map with get(). */
static PyObject *
header(PyObject *req, PyObject *name)
{
    PyObject *headers = slot(req, request_offsets[REQ_HEADERS]);
    if (headers == NULL) {
        PyErr_SetString(PyExc_AttributeError, "the request has no headers");
        return NULL;
    }
    if (!PyDict_CheckExact(headers))
        return PyObject_CallMethodOneArg(headers, str_get, name);
    PyObject *value = PyDict_GetItemWithError(headers, name);
    if (value != NULL)
        return Py_NewRef(value);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* put(start, end, status, sent, declared, method, path, query, request_id, live) */
static int
put(Recorder *self, int64_t end, PyObject *const *args)
{
    int64_t start = as_int64(args[0]);
    if (start == -1 && PyErr_Occurred())
        return -1;
    long status = PyLong_AsLong(args[1]);
    if (status == -1 && PyErr_Occurred())
        return -1;
    int64_t sent = as_int64(args[2]);
    if (sent == -1 && PyErr_Occurred())
        return -1;
    if (check_str(args[4], "method") || check_str(args[5], "path") ||
        check_str(args[6], "query"))
        return -1;
    if ((args[3] != Py_None && check_str(args[3], "declared")) ||
        (args[7] != Py_None && check_str(args[7], "request_id")) ||
        (args[8] != Py_None && check_str(args[8], "live")))
        return -1;
    if (self->size == self->capacity) {
        Py_ssize_t capacity = self->capacity ? self->capacity * 2 : 256;
        Record *grown = PyMem_Realloc(self->records, capacity * sizeof(Record));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->records = grown;
        self->capacity = capacity;
    }
    Record *previous = self->size ? &self->records[self->size - 1] : NULL;
    Record *r = &self->records[self->size++];
    r->start = start;
    r->end = end;
    r->status = (int)status;
    r->sent = sent;
    keep_text(&r->declared, r->declared_text, DECLARED_SIZE, args[3]);
    r->method = shared(self, args[4], previous ? previous->method : NULL);
    r->path = same(args[5], previous ? previous->path : NULL);
    r->query = PyUnicode_GET_LENGTH(args[6]) ? Py_NewRef(args[6]) : NULL;
    keep_text(&r->request_id, r->request_id_text, ID_SIZE, args[7]);
    r->live = args[8] != Py_None ? Py_NewRef(args[8]) : NULL;
    return 0;
}

/* add(req, res): the request begin() saw begin, ended now, read from its
 * request and response objects. */
static PyObject *
Recorder_add(Recorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_pair("add", args, nargs) < 0)
        return NULL;
    PyObject *req = args[0], *res = args[1];
    PyObject *start = slot(res, response_offsets[RES_START]);
    if (start == NULL) {
        PyErr_SetString(PyExc_TypeError, "add() of a response begin() did not see");
        return NULL;
    }
    PyObject *query = slot(res, response_offsets[RES_QUERY]);
    PyObject *live = slot(res, response_offsets[RES_LIVE]);
    PyObject *status = slot(res, response_offsets[RES_STATUS]);
    PyObject *sent = slot(res, response_offsets[RES_SENT]);
    PyObject *method = slot(req, request_offsets[REQ_METHOD]);
    PyObject *request_id = slot(res, response_offsets[RES_REQUEST_ID]);
    if (status == NULL || sent == NULL || method == NULL || request_id == NULL) {
        PyErr_SetString(PyExc_AttributeError, "the request or its response is incomplete");
        return NULL;
    }
    PyObject *path = slot(req, request_offsets[REQ_PATH]);
    path = path != NULL && path != Py_None ? Py_NewRef(path)
                                           : PyObject_CallMethodNoArgs(req, str_loggable_path);
    if (path == NULL)
        return NULL;
    PyObject *declared = header(req, str_content_length);
    if (declared == NULL) {
        Py_DECREF(path);
        return NULL;
    }
    PyObject *fields[9] = {start,  status, sent, declared, method, path, query ? query : Py_None,
                           request_id, live ? live : Py_None};
    int failed = put(self, monotonic_ns(), fields) < 0;
    Py_DECREF(path);
    Py_DECREF(declared);
    if (failed)
        return NULL;
    /* The caller's cue: a batch to drain later (its first record), or now. */
    return PyBool_FromLong(self->size == 1 || self->size >= self->full);
}

static PyObject *
Recorder_put(Recorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError, "put() takes 10 arguments (%zd given)", nargs);
        return NULL;
    }
    int64_t end = as_int64(args[1]);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    PyObject *rest[9];
    rest[0] = args[0];
    memcpy(&rest[1], &args[2], 8 * sizeof(PyObject *));
    if (put(self, end, rest) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Recorder_clear(Recorder *self, PyObject *unused)
{
    /* Strings only: releasing them runs no Python code. */
    for (Py_ssize_t i = 0; i < self->size; i++)
        record_clear(&self->records[i]);
    self->size = 0;
    if (self->capacity > 4 * self->full) { /* after a burst, give the memory back */
        PyMem_Free(self->records);
        self->records = NULL;
        self->capacity = 0;
    }
    if (PyDict_GET_SIZE(self->shared) >= SHARED_MAX)
        PyDict_Clear(self->shared);
    Py_RETURN_NONE;
}

static Py_ssize_t
Recorder_len(Recorder *self)
{
    return self->size;
}

/* -- columns: the batch as the Python drain reads it ----------------------------- */

static PyObject *
or_none(PyObject *value)
{
    return Py_NewRef(value != NULL ? value : Py_None);
}

static PyObject *
empty_str(void)
{
    return PyUnicode_FromStringAndSize(NULL, 0); /* the shared empty str */
}

static PyObject *
text_object(const Text *text, const char *copy)
{
    if (text->object != NULL)
        return Py_NewRef(text->object);
    if (text->length < 0)
        Py_RETURN_NONE;
    return PyUnicode_FromStringAndSize(copy, text->length);
}

static PyObject *
Recorder_columns(Recorder *self, PyObject *unused)
{
    Py_ssize_t n = self->size;
    PyObject *columns[10];
    PyObject *result = NULL;
    int made = 0;
    for (; made < 10; made++) {
        columns[made] = PyTuple_New(n);
        if (columns[made] == NULL)
            goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Record *r = &self->records[i];
        PyObject *start = PyLong_FromLongLong(r->start);
        PyObject *end = PyLong_FromLongLong(r->end);
        PyObject *status = PyLong_FromLong(r->status);
        PyObject *sent = PyLong_FromLongLong(r->sent);
        PyObject *declared = text_object(&r->declared, r->declared_text);
        PyObject *request_id = text_object(&r->request_id, r->request_id_text);
        if (start == NULL || end == NULL || status == NULL || sent == NULL || declared == NULL ||
            request_id == NULL) {
            Py_XDECREF(start);
            Py_XDECREF(end);
            Py_XDECREF(status);
            Py_XDECREF(sent);
            Py_XDECREF(declared);
            Py_XDECREF(request_id);
            goto done;
        }
        PyTuple_SET_ITEM(columns[0], i, start);
        PyTuple_SET_ITEM(columns[1], i, end);
        PyTuple_SET_ITEM(columns[2], i, status);
        PyTuple_SET_ITEM(columns[3], i, sent);
        PyTuple_SET_ITEM(columns[4], i, declared);
        PyTuple_SET_ITEM(columns[5], i, Py_NewRef(r->method));
        PyTuple_SET_ITEM(columns[6], i, Py_NewRef(r->path));
        PyTuple_SET_ITEM(columns[7], i, r->query != NULL ? Py_NewRef(r->query) : empty_str());
        PyTuple_SET_ITEM(columns[8], i, request_id);
        PyTuple_SET_ITEM(columns[9], i, or_none(r->live));
    }
    result = PyTuple_New(10);
    if (result == NULL)
        goto done;
    for (int c = 0; c < 10; c++) {
        PyTuple_SET_ITEM(result, c, columns[c]);
        columns[c] = NULL;
    }
done:
    for (int c = 0; c < made; c++)
        Py_XDECREF(columns[c]);
    return result;
}

/* -- declared Content-Length --------------------------------------------------- */

/* The declared length as logged: its digits when it is all ASCII digits, at
 * most DECLARED_DIGITS_MAX of them, else "0" (recorder.py's declared_digits).
 * Sets *digits and *length; returns the value, or -1 when the digits are more
 * than an int64 holds. */
static int64_t
declared_length(const Record *r, const char **digits, Py_ssize_t *length)
{
    const char *text = NULL;
    Py_ssize_t len = 0;
    if (r->declared.object != NULL) {
        if (PyUnicode_IS_ASCII(r->declared.object)) {
            text = (const char *)PyUnicode_DATA(r->declared.object);
            len = PyUnicode_GET_LENGTH(r->declared.object);
        }
    }
    else if (r->declared.length > 0) {
        text = r->declared_text;
        len = r->declared.length;
    }
    int64_t value = 0;
    Py_ssize_t i = 0;
    for (; i < len && text[i] >= '0' && text[i] <= '9'; i++)
        value = i < 18 ? value * 10 + (text[i] - '0') : -1;
    if (len > 0 && len <= DECLARED_DIGITS_MAX && i == len) {
        *digits = text;
        *length = len;
        return value;
    }
    *digits = "0";
    *length = 1;
    return 0;
}

/* -- tallies: a batch of appends, counted in one pass -------------------------- */

/* tally(prefix, bounds) -> None, or (statuses, received, sent, buckets, total_ns)
 * when every request is a POST under prefix: counts by status (0 counted as
 * 499), bytes received (as declared) and sent, latency bucket counts (the
 * first bound >= the duration; bounds in nanoseconds, ascending, the last
 * bucket for longer ones) and the durations' sum in nanoseconds. */
static PyObject *
Recorder_tally(Recorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "tally(prefix: str, bounds: tuple[int, ...])");
        return NULL;
    }
    PyObject *prefix = args[0];
    Py_ssize_t nbounds = PyTuple_GET_SIZE(args[1]);
    if (nbounds > 64) {
        PyErr_SetString(PyExc_ValueError, "at most 64 bounds");
        return NULL;
    }
    int64_t bounds[64];
    for (Py_ssize_t b = 0; b < nbounds; b++) {
        bounds[b] = PyLong_AsLongLong(PyTuple_GET_ITEM(args[1], b));
        if (bounds[b] == -1 && PyErr_Occurred())
            return NULL;
    }
    /* Every record a POST under prefix? (Shared objects, see same() and shared(): a
     * method or path the record before had was checked with it.) */
    Py_ssize_t prefix_length = PyUnicode_GET_LENGTH(prefix);
    int prefix_kind = PyUnicode_KIND(prefix);
    for (Py_ssize_t i = 0; i < self->size; i++) {
        Record *r = &self->records[i];
        if (r->live != NULL)
            Py_RETURN_NONE;
        if (i > 0 && r->path == r[-1].path && r->method == r[-1].method)
            continue;
        if ((i == 0 || r->method != r[-1].method) &&
            PyUnicode_CompareWithASCIIString(r->method, "POST") != 0)
            Py_RETURN_NONE;
        if (PyUnicode_GET_LENGTH(r->path) < prefix_length || PyUnicode_KIND(r->path) != prefix_kind ||
            memcmp(PyUnicode_DATA(r->path), PyUnicode_DATA(prefix), prefix_length * prefix_kind) != 0) {
            /* (a path of a wider kind than the prefix may still start with it) */
            Py_ssize_t match = PyUnicode_Tailmatch(r->path, prefix, 0, PY_SSIZE_T_MAX, -1);
            if (match < 0)
                return NULL;
            if (match == 0)
                Py_RETURN_NONE;
        }
    }
    int64_t counts[65] = {0};
    int64_t received = 0, sent = 0, total = 0;
    int statuses[16], status_counts[16];
    int nstatuses = 0;
    for (Py_ssize_t i = 0; i < self->size; i++) {
        Record *r = &self->records[i];
        const char *digits;
        Py_ssize_t length;
        int64_t declared = declared_length(r, &digits, &length);
        int64_t elapsed = r->end - r->start;
        if (declared < 0 || __builtin_add_overflow(received, declared, &received) ||
            __builtin_add_overflow(sent, r->sent, &sent) ||
            __builtin_add_overflow(total, elapsed, &total))
            Py_RETURN_NONE; /* past int64: the Python drain counts it */
        Py_ssize_t bucket = 0;
        while (bucket < nbounds && bounds[bucket] < elapsed)
            bucket++;
        counts[bucket]++;
        int status = r->status ? r->status : CLIENT_CLOSED;
        int s = 0;
        while (s < nstatuses && statuses[s] != status)
            s++;
        if (s == nstatuses) {
            if (nstatuses == 16)
                Py_RETURN_NONE; /* more kinds of status than appends have */
            statuses[nstatuses] = status;
            status_counts[nstatuses++] = 0;
        }
        status_counts[s]++;
    }
    PyObject *by_status = PyDict_New();
    if (by_status == NULL)
        return NULL;
    for (int s = 0; s < nstatuses; s++) {
        PyObject *key = PyLong_FromLong(statuses[s]);
        PyObject *value = PyLong_FromLong(status_counts[s]);
        int failed = key == NULL || value == NULL || PyDict_SetItem(by_status, key, value) < 0;
        Py_XDECREF(key);
        Py_XDECREF(value);
        if (failed) {
            Py_DECREF(by_status);
            return NULL;
        }
    }
    PyObject *buckets = PyList_New(nbounds + 1);
    if (buckets == NULL) {
        Py_DECREF(by_status);
        return NULL;
    }
    for (Py_ssize_t b = 0; b <= nbounds; b++) {
        PyObject *count = PyLong_FromLongLong(counts[b]);
        if (count == NULL) {
            Py_DECREF(by_status);
            Py_DECREF(buckets);
            return NULL;
        }
        PyList_SET_ITEM(buckets, b, count);
    }
    return Py_BuildValue("(NLLNL)", by_status, (long long)received, (long long)sent, buckets,
                         (long long)total);
}

/* -- text lines ------------------------------------------------------------------ */

typedef struct {
    char *data;
    Py_ssize_t size;
    Py_ssize_t capacity;
    PyObject *bytes; /* when set: the bytes object data is in (text(): no copy at the end) */
} Buffer;

/* Room for more bytes: the buffer grown (doubled) when they do not fit. */
static int
grow(Buffer *b, Py_ssize_t more)
{
    Py_ssize_t capacity = b->capacity ? b->capacity : 4096;
    while (capacity < b->size + more)
        capacity *= 2;
    if (b->bytes != NULL) {
        if (_PyBytes_Resize(&b->bytes, capacity) < 0) { /* (b->bytes freed, and NULL) */
            b->data = NULL;
            return -1;
        }
        b->data = PyBytes_AS_STRING(b->bytes);
    }
    else {
        char *grown = PyMem_Realloc(b->data, capacity);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->data = grown;
    }
    b->capacity = capacity;
    return 0;
}

static int
reserve(Buffer *b, Py_ssize_t more)
{
    return b->size + more <= b->capacity ? 0 : grow(b, more);
}

/* Inlined: a line is a dozen short pieces, most of them literals whose copy
 * the compiler then makes in a few moves. */
static inline __attribute__((always_inline)) int
append(Buffer *b, const char *text, Py_ssize_t length)
{
    if (b->size + length > b->capacity && grow(b, length) < 0)
        return -1;
    memcpy(b->data + b->size, text, length);
    b->size += length;
    return 0;
}

#define APPEND_LITERAL(b, s) append((b), (s), (Py_ssize_t)sizeof(s) - 1)

/* A str as UTF-8; characters UTF-8 cannot hold (lone surrogates) as
 * backslash escapes, as the Python recorder's encode("utf-8",
 * "backslashreplace") writes them. */
static int
append_str(Buffer *b, PyObject *text)
{
    if (PyUnicode_IS_ASCII(text))
        return append(b, (const char *)PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text));
    Py_ssize_t length;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &length);
    if (utf8 != NULL)
        return append(b, utf8, length);
    PyErr_Clear();
    PyObject *encoded = PyUnicode_AsEncodedString(text, "utf-8", "backslashreplace");
    if (encoded == NULL)
        return -1;
    int result = append(b, PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded));
    Py_DECREF(encoded);
    return result;
}

static int
append_text(Buffer *b, const Text *text, const char *copy)
{
    if (text->object != NULL)
        return append_str(b, text->object);
    if (text->length < 0)
        return APPEND_LITERAL(b, "None");
    return append(b, copy, text->length);
}

/* magnitude's decimal digits, written backwards so that they end at end;
 * returns where they start (snprintf costs more than the rest of a line). */
static char *
decimal(char *end, uint64_t magnitude)
{
    do {
        *--end = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude);
    return end;
}

/* value in decimal. */
static int
append_int(Buffer *b, int64_t value)
{
    if (value >= 0 && value < 10) {
        char digit = (char)('0' + value);
        return append(b, &digit, 1);
    }
    if (value >= 100 && value < 1000) { /* a status */
        char three[3] = {(char)('0' + value / 100), (char)('0' + value / 10 % 10),
                         (char)('0' + value % 10)};
        return append(b, three, 3);
    }
    char digits[24];
    char *end = digits + sizeof digits;
    char *at = decimal(end, value < 0 ? (uint64_t)0 - (uint64_t)value : (uint64_t)value);
    if (value < 0)
        *--at = '-';
    return append(b, at, end - at);
}

/* The wall-clock time of a monotonic reading, to the millisecond: the
 * date and time are made again only when the second changes, the
 * milliseconds when the millisecond does (requests end in order). */
static int
append_stamp(Recorder *self, Buffer *b, int64_t end)
{
    int64_t millis = floordiv(end, 1000000) + self->offset_ms;
    if (millis != self->millis) {
        int64_t second = floordiv(millis, 1000);
        if (second != self->second) {
            time_t t = (time_t)second;
            struct tm tm;
            if (gmtime_r(&t, &tm) == NULL ||
                strftime(self->stamp, sizeof self->stamp, "%Y-%m-%dT%H:%M:%S", &tm) != 19) {
                PyErr_SetString(PyExc_OverflowError, "timestamp out of range");
                return -1;
            }
            self->stamp[19] = '.';
            self->stamp[23] = 'Z';
            self->second = second;
        }
        int ms = (int)(millis - second * 1000);
        self->stamp[20] = (char)('0' + ms / 100);
        self->stamp[21] = (char)('0' + ms / 10 % 10);
        self->stamp[22] = (char)('0' + ms % 10);
        self->millis = millis;
    }
    return append(b, self->stamp, STAMP_LENGTH);
}

/* The JSON-quoted target: from the cache when the path is a busy one and
 * there is no query, else from target_of (which caches what it quotes). */
static PyObject *
quoted_target(Recorder *self, Record *r)
{
    if (r->query == NULL) {
        PyObject *quoted = PyDict_GetItemWithError(self->quoted, r->path);
        if (quoted != NULL)
            return Py_NewRef(quoted);
        if (PyErr_Occurred())
            return NULL;
    }
    PyObject *query = r->query != NULL ? Py_NewRef(r->query) : empty_str();
    if (query == NULL)
        return NULL;
    PyObject *quoted = PyObject_CallFunctionObjArgs(self->target_of, r->path, query, NULL);
    Py_DECREF(query);
    if (quoted != NULL && !PyUnicode_Check(quoted)) {
        Py_DECREF(quoted);
        PyErr_SetString(PyExc_TypeError, "target_of must return str");
        return NULL;
    }
    return quoted;
}

/* A method as logged: at most METHOD_LOG_MAX characters, then "..."
 * (recorder.py's logged_methods). */
static int
append_method(Buffer *b, PyObject *method)
{
    if (PyUnicode_GET_LENGTH(method) <= METHOD_LOG_MAX)
        return append_str(b, method);
    PyObject *start = PyUnicode_Substring(method, 0, METHOD_LOG_MAX);
    if (start == NULL)
        return -1;
    int failed = append_str(b, start) < 0 || APPEND_LITERAL(b, "...") < 0;
    Py_DECREF(start);
    return failed ? -1 : 0;
}

/* The record's target as logged, JSON-quoted. A plain path (printable ASCII
 * but '"' and '\\', and short enough: the usual one) is its own text between
 * quotes, as orjson writes it; any other comes from quoted_target(). */
static int
append_target(Recorder *self, Buffer *b, Record *r)
{
    if (r->query == NULL && PyUnicode_IS_ASCII(r->path) &&
        PyUnicode_GET_LENGTH(r->path) <= TARGET_MAX_BYTES - 2) {
        Py_ssize_t length = PyUnicode_GET_LENGTH(r->path);
        const unsigned char *text = PyUnicode_1BYTE_DATA(r->path);
        Py_ssize_t i = 0;
        while (i < length && text[i] >= 0x20 && text[i] < 0x7f && text[i] != '"' && text[i] != '\\')
            i++;
        if (i == length) {
            if (reserve(b, length + 2) < 0)
                return -1;
            b->data[b->size] = '"';
            memcpy(b->data + b->size + 1, text, length);
            b->data[b->size + 1 + length] = '"';
            b->size += length + 2;
            return 0;
        }
    }
    PyObject *quoted = quoted_target(self, r);
    if (quoted == NULL)
        return -1;
    int failed = append_str(b, quoted);
    Py_DECREF(quoted);
    return failed;
}

/* text(instance) -> bytes: the batch's text log lines, as PyRecorder.text
 * writes them. */
static PyObject *
Recorder_text(Recorder *self, PyObject *instance)
{
    if (!PyUnicode_Check(instance)) {
        PyErr_SetString(PyExc_TypeError, "instance must be str");
        return NULL;
    }
    /* What every line has between its time and its request id. */
    Buffer head = {NULL, 0, 0, NULL};
    if (APPEND_LITERAL(&head, " instance=") < 0 || append_str(&head, instance) < 0 ||
        APPEND_LITERAL(&head, " request_id=") < 0) {
        PyMem_Free(head.data);
        return NULL;
    }
    /* The lines are written into the bytes object text() returns, sized for
     * the usual line and cut to size at the end: no copy of a batch's lines. */
    if (self->size == 0) {
        PyMem_Free(head.data);
        return PyBytes_FromStringAndSize(NULL, 0);
    }
    Buffer b = {NULL, 0, self->size * 256, PyBytes_FromStringAndSize(NULL, self->size * 256)};
    if (b.bytes == NULL) {
        PyMem_Free(head.data);
        return NULL;
    }
    b.data = PyBytes_AS_STRING(b.bytes);
    /* What the last line has from the method to the status, for the next
     * with the same method and path and no query (middle_path: only
     * compared, never read). */
    const PyObject *middle_path = NULL;
    const PyObject *middle_method = NULL;
    Buffer middle = {NULL, 0, 0, NULL};
    for (Py_ssize_t i = 0; i < self->size; i++) {
        Record *r = &self->records[i];
        if (r->query != NULL || r->path != middle_path || r->method != middle_method) {
            middle.size = 0;
            if (APPEND_LITERAL(&middle, " method=") < 0 || append_method(&middle, r->method) < 0 ||
                APPEND_LITERAL(&middle, " path=") < 0 || append_target(self, &middle, r) < 0 ||
                APPEND_LITERAL(&middle, " status=") < 0)
                goto error;
            /* quoted_target may run Python: should it record or clear (it
             * does not), the records may have moved. */
            if (i >= self->size)
                break;
            r = &self->records[i];
            middle_path = r->query == NULL ? r->path : NULL;
            middle_method = r->method;
        }
        const char *digits;
        Py_ssize_t length;
        declared_length(r, &digits, &length);
        int failed =
            append_stamp(self, &b, r->end) < 0 || append(&b, head.data, head.size) < 0 ||
            append_text(&b, &r->request_id, r->request_id_text) < 0 ||
            append(&b, middle.data, middle.size) < 0 ||
            append_int(&b, r->status ? r->status : CLIENT_CLOSED) < 0 ||
            APPEND_LITERAL(&b, " received_bytes=") < 0 || append(&b, digits, length) < 0 ||
            APPEND_LITERAL(&b, " sent_bytes=") < 0 || append_int(&b, r->sent) < 0 ||
            APPEND_LITERAL(&b, " duration_us=") < 0 ||
            append_int(&b, floordiv(r->end - r->start, 1000)) < 0 ||
            APPEND_LITERAL(&b, "\n") < 0;
        if (failed)
            goto error;
    }
    PyMem_Free(head.data);
    PyMem_Free(middle.data);
    if (_PyBytes_Resize(&b.bytes, b.size) < 0)
        return NULL;
    return b.bytes;
error:
    PyMem_Free(head.data);
    PyMem_Free(middle.data);
    Py_XDECREF(b.bytes);
    return NULL;
}

/* -- the type ------------------------------------------------------------------ */

static PyObject *
Recorder_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"full", "id_prefix", "quoted", "target_of", "offset_ns", "ids",
                               NULL};
    Py_ssize_t full;
    PyObject *id_prefix, *quoted, *target_of;
    long long offset_ns;
    int ids = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nUO!OL|p", keywords, &full, &id_prefix,
                                     &PyDict_Type, &quoted, &target_of, &offset_ns, &ids))
        return NULL;
    if (!PyCallable_Check(target_of)) {
        PyErr_SetString(PyExc_TypeError, "target_of must be callable");
        return NULL;
    }
    if (!PyUnicode_IS_ASCII(id_prefix) || PyUnicode_GET_LENGTH(id_prefix) > ID_PREFIX_MAX) {
        PyErr_SetString(PyExc_ValueError, "id_prefix must be ASCII, at most 32 characters");
        return NULL;
    }
    Recorder *self = (Recorder *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->shared = PyDict_New();
    if (self->shared == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->full = full;
    self->ids = ids;
    self->id_prefix = Py_NewRef(id_prefix);
    self->id_prefix_length = (int)PyUnicode_GET_LENGTH(id_prefix);
    memcpy(self->id_text, PyUnicode_DATA(id_prefix), self->id_prefix_length);
    self->quoted = Py_NewRef(quoted);
    self->target_of = Py_NewRef(target_of);
    self->offset_ms = floordiv(offset_ns, 1000000);
    self->millis = INT64_MIN;
    self->second = INT64_MIN;
    return (PyObject *)self;
}

static int
Recorder_traverse(Recorder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->shared);
    Py_VISIT(self->id_prefix);
    Py_VISIT(self->quoted);
    Py_VISIT(self->target_of);
    return 0;
}

static int
Recorder_clear_refs(Recorder *self)
{
    Py_CLEAR(self->shared);
    Py_CLEAR(self->id_prefix);
    Py_CLEAR(self->quoted);
    Py_CLEAR(self->target_of);
    return 0;
}

static void
Recorder_dealloc(Recorder *self)
{
    PyObject_GC_UnTrack(self);
    for (Py_ssize_t i = 0; i < self->size; i++)
        record_clear(&self->records[i]);
    PyMem_Free(self->records);
    Recorder_clear_refs(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* new_id() -> str: the prefix and the next number, a request id unique to
 * this recorder (the prefix makes it unique across processes). */
static PyObject *
Recorder_new_id(Recorder *self, PyObject *unused)
{
    char digits[24];
    char *end = digits + sizeof digits;
    char *at = decimal(end, ++self->ids_made);
    memcpy(self->id_text + self->id_prefix_length, at, end - at);
    Py_ssize_t length = self->id_prefix_length + (end - at);
    PyObject *id = PyUnicode_New(length, 127);
    if (id != NULL)
        memcpy(PyUnicode_DATA(id), self->id_text, length);
    return id;
}

/* What a client's X-Request-Id may be to be kept: a plain token of at most
 * REQUEST_ID_MAX letters, digits and ._:/+=@- (recorder.py's
 * VALID_REQUEST_ID). */
#define REQUEST_ID_MAX 128
static char id_char[128];

static int
plain_token(PyObject *value)
{
    if (!PyUnicode_CheckExact(value) || !PyUnicode_IS_ASCII(value))
        return 0;
    Py_ssize_t length = PyUnicode_GET_LENGTH(value);
    if (length < 1 || length > REQUEST_ID_MAX)
        return 0;
    const unsigned char *text = PyUnicode_1BYTE_DATA(value);
    for (Py_ssize_t i = 0; i < length; i++)
        if (!id_char[text[i]])
            return 0;
    return 1;
}

/* request_id(sent) -> str: the client's id (str or None) when it is a plain
 * token, else a new one. */
static PyObject *
Recorder_request_id(Recorder *self, PyObject *sent)
{
    if (sent != Py_None && plain_token(sent))
        return Py_NewRef(sent);
    return Recorder_new_id(self, NULL);
}

#define ID_LINE_NAME REQUEST_ID_HEADER ": "

/* begin(req, res) -> bool: a request starts. Notes on its response what
 * add() records when it ends: the clock (start), the query as it came (query:
 * an SSE request releases its own), no live operation yet (live), and with
 * ids on, its request id (request_id, from request_id() of the request's
 * first X-Request-Id, read without refusing a repeat: the log must not fail)
 * and that id's HTTP/1.1 header line (id_line). True for a GET that asks for
 * live=, which Telemetry.live_reader then counts (and notes as live). */
static PyObject *
Recorder_begin(Recorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_pair("begin", args, nargs) < 0)
        return NULL;
    PyObject *req = args[0], *res = args[1];
    PyObject *query = slot(req, request_offsets[REQ_QUERY]);
    PyObject *method = slot(req, request_offsets[REQ_METHOD]);
    if (query == NULL || method == NULL || check_str(query, "query_string") ||
        check_str(method, "method")) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_AttributeError, "the request is incomplete");
        return NULL;
    }
    if (self->ids) {
        PyObject *sent = header(req, str_request_id_header);
        if (sent == NULL)
            return NULL;
        PyObject *id = Recorder_request_id(self, sent);
        Py_DECREF(sent);
        if (id == NULL)
            return NULL;
        /* (a plain token or a new id: ASCII) */
        Py_ssize_t length = PyUnicode_GET_LENGTH(id), name = sizeof ID_LINE_NAME - 1;
        PyObject *line = PyBytes_FromStringAndSize(NULL, name + length + 2);
        if (line == NULL) {
            Py_DECREF(id);
            return NULL;
        }
        char *at = PyBytes_AS_STRING(line);
        memcpy(at, ID_LINE_NAME, name);
        memcpy(at + name, PyUnicode_DATA(id), length);
        memcpy(at + name + length, "\r\n", 2);
        Py_XSETREF(RES_SLOT(res, RES_REQUEST_ID), id);
        Py_XSETREF(RES_SLOT(res, RES_ID_LINE), line);
    }
    PyObject *start = PyLong_FromLongLong(monotonic_ns());
    if (start == NULL)
        return NULL;
    Py_XSETREF(RES_SLOT(res, RES_START), start);
    Py_XSETREF(RES_SLOT(res, RES_QUERY), Py_NewRef(query));
    Py_XSETREF(RES_SLOT(res, RES_LIVE), Py_NewRef(Py_None));
    /* (a live read: rare, and the caller's to tell) */
    return PyBool_FromLong(PyUnicode_GET_LENGTH(method) == 3 &&
                           PyUnicode_CompareWithASCIIString(method, "GET") == 0 &&
                           PyUnicode_Find(query, str_live, 0, PY_SSIZE_T_MAX, 1) >= 0);
}

static PyMethodDef Recorder_methods[] = {
    {"new_id", (PyCFunction)Recorder_new_id, METH_NOARGS, "a new request id"},
    {"begin", (PyCFunction)(void (*)(void))Recorder_begin, METH_FASTCALL,
     "begin(req, res) -> bool: a request starts; notes on the response what add() records "
     "(and with ids on, the request id); True for a GET asking for live="},
    {"request_id", (PyCFunction)Recorder_request_id, METH_O,
     "request_id(sent: str | None) -> str: the client's X-Request-Id when it is a plain token, "
     "else a new id"},
    {"add", (PyCFunction)(void (*)(void))Recorder_add, METH_FASTCALL,
     "add(req, res) -> bool: record a request begin() saw begin, ended now; True when it "
     "begins the batch or fills it"},
    {"put", (PyCFunction)(void (*)(void))Recorder_put, METH_FASTCALL,
     "put(start, end, status, sent, declared, method, path, query, request_id, live)"},
    {"columns", (PyCFunction)Recorder_columns, METH_NOARGS,
     "the batch as 10 tuples: starts, ends, statuses, sents, declared, methods, paths, "
     "queries, request ids, live operations"},
    {"tally", (PyCFunction)(void (*)(void))Recorder_tally, METH_FASTCALL,
     "tally(prefix, bounds): a batch of appends counted, or None"},
    {"text", (PyCFunction)Recorder_text, METH_O, "text(instance: str) -> bytes: the text log lines"},
    {"clear", (PyCFunction)Recorder_clear, METH_NOARGS, "forget the batch"},
    {NULL}};

static PySequenceMethods Recorder_as_sequence = {.sq_length = (lenfunc)Recorder_len};

static PyTypeObject RecorderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "gateway.web._recorder.Recorder",
    .tp_basicsize = sizeof(Recorder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Finished requests, kept until the next drain.",
    .tp_new = Recorder_new,
    .tp_dealloc = (destructor)Recorder_dealloc,
    .tp_traverse = (traverseproc)Recorder_traverse,
    .tp_clear = (inquiry)Recorder_clear_refs,
    .tp_methods = Recorder_methods,
    .tp_as_sequence = &Recorder_as_sequence,
};

static PyMethodDef module_methods[] = {
    {"now", now, METH_NOARGS, "CLOCK_MONOTONIC in nanoseconds (time.perf_counter_ns's clock)"},
    {"layout", (PyCFunction)(void (*)(void))layout, METH_FASTCALL,
     "layout(Request, Response): the classes begin() and add() read and write"},
    {NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_recorder", .m_doc = "The request recorder, in C.",
    .m_size = -1, .m_methods = module_methods};

PyMODINIT_FUNC
PyInit__recorder(void)
{
    for (int c = 0; c < 128; c++)
        id_char[c] = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                     (c != 0 && strchr("._:/+=@-", c) != NULL);
    str_request_id_header = PyUnicode_InternFromString(REQUEST_ID_HEADER);
    str_content_length = PyUnicode_InternFromString("content-length");
    str_get = PyUnicode_InternFromString("get");
    str_loggable_path = PyUnicode_InternFromString("loggable_path");
    str_live = PyUnicode_InternFromString("live=");
    if (str_request_id_header == NULL || str_content_length == NULL || str_get == NULL ||
        str_loggable_path == NULL || str_live == NULL)
        return NULL;
    if (PyType_Ready(&RecorderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Recorder", (PyObject *)&RecorderType) < 0 ||
        PyModule_AddIntConstant(m, "TARGET_MAX_BYTES", TARGET_MAX_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
