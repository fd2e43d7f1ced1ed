/* srcid.service._bodyjson: a JSON request body as Python values, every rectangular nest of numbers under a
 * "features" key as one float64 buffer instead of a Python float per number (srcid/service/bodies.py says why).
 *
 * parse(data, make_array) reads the JSON text `data` (bytes-like) and returns what orjson.loads would, except that
 * the value of an object's "features" key, where it is a rectangular nest of lists of numbers (every list at one
 * level of one nonzero length, numbers only at the innermost level), is make_array(buffer, shape): `buffer` bytes
 * of native float64, `shape` a tuple of ints. A features value that is not such a rectangle is read as any other
 * value (lists of ints and floats).
 *
 * It raises Declined for any text it does not read exactly as orjson would, and the caller hands that text to
 * orjson instead: so this reads a subset of JSON and never answers differently. Declined are: anything not JSON
 * (including NaN and Infinity, and text after the value), a string holding a backslash escape or text that is not
 * UTF-8, an object with a key twice (orjson keeps the last value, in the first key's place), nesting deeper than
 * MAX_DEPTH, an integer of more than 18 digits outside features and any integer past 2^53 in magnitude inside
 * them (orjson's int, then numpy's int64 conversion, may round it differently), and a number past the float64
 * range (orjson refuses it; Python's json reads it as infinity).
 *
 * Numbers are read correctly rounded, as orjson and Python's float() read them: a decimal of at most 19
 * significant digits whose power of ten is within 10^+-22 is one exact integer times or divided by one exact
 * power of ten, which IEEE arithmetic rounds once (Clinger's fast path); any other goes to
 * PyOS_string_to_double, CPython's own correctly rounded conversion. A features list's numbers, mostly of a few
 * digits each side of the point, are read eight digits at a time (read_short_number): ~1,280 of them a [10, 128]
 * body, the most time this spends on any body. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "read_short_number reads eight digits as a little-endian 64-bit word"
#endif

#define MAX_DEPTH 64
#define MAX_DIMS 8
#define MAX_SLOW_NUMBER 400 /* characters of a number PyOS_string_to_double reads from a copy; longer: Declined */

static PyObject *Declined;

typedef struct {
    const char *p, *end;
    PyObject *make_array;
    int depth;
    double *numbers; /* the features rectangle being read */
    Py_ssize_t count, capacity;
} Reader;

typedef struct {
    double value;
    int is_integer;    /* no fraction, no exponent */
    int exact_integer; /* an integer of magnitude at most 2^53, exact as `value` */
    int too_large;     /* an integer of more than 18 digits */
    int64_t integer;   /* an integer's value, unless too_large */
} Number;

static const double POWERS_OF_TEN[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                       1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

static PyObject *declined(void) {
    PyErr_SetNone(Declined);
    return NULL;
}

static inline const char *past_space(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    return p;
}

static inline void skip_space(Reader *r) { r->p = past_space(r->p, r->end); }

static inline int is_digit(char c) { return c >= '0' && c <= '9'; }

/* How many of the 8 bytes at p, from the first, are ASCII digits. */
static inline int leading_digits(uint64_t chunk) {
    uint64_t not_digit = ((chunk & UINT64_C(0xF0F0F0F0F0F0F0F0)) ^ UINT64_C(0x3030303030303030)) |
                         (((chunk + UINT64_C(0x0606060606060606)) & UINT64_C(0xF0F0F0F0F0F0F0F0)) ^
                          UINT64_C(0x3030303030303030));
    return not_digit ? __builtin_ctzll(not_digit) / 8 : 8;
}

/* The value of the first `count` (1 to 8) digits of `chunk`, the first digit in its lowest byte. */
static inline uint64_t digits_value(uint64_t chunk, int count) {
    uint64_t v = (chunk - UINT64_C(0x3030303030303030)) << (8 * (8 - count)); /* the digits, after leading zeros */
    v = v * 10 + (v >> 8);
    v = (((v & UINT64_C(0x000000FF000000FF)) * UINT64_C(0x000F424000000064)) +
         (((v >> 16) & UINT64_C(0x000000FF000000FF)) * UINT64_C(0x0000271000000001))) >> 32;
    return v;
}

/* A number of 1 to 7 digits, with a point and 1 to 7 more or none, and no exponent (what a features list mostly
 * holds), read eight digits at a time: the end of the number, its value in *value and the byte after it in *after;
 * NULL to leave it to read_number. The text from p on must be at least SHORT_NUMBER_SPAN bytes long. */
#define SHORT_NUMBER_SPAN 18
static inline const char *read_short_number(const char *p, double *value, char *after) {
    int negative = *p == '-';
    p += negative;
    uint64_t chunk;
    memcpy(&chunk, p, 8);
    int count = leading_digits(chunk);
    if (count == 0 || count == 8 || (count > 1 && *p == '0'))
        return NULL;
    uint64_t mantissa = digits_value(chunk, count);
    char next = (char)(chunk >> (8 * count));
    p += count;
    if (next == '.') {
        memcpy(&chunk, p + 1, 8);
        int decimals = leading_digits(chunk);
        if (decimals == 0 || decimals == 8)
            return NULL;
        next = (char)(chunk >> (8 * decimals));
        if ((next | 0x20) == 'e')
            return NULL;
        /* both exact (mantissa < 10^14 < 2^53), so the quotient is rounded once */
        double v = (double)(mantissa * (uint64_t)POWERS_OF_TEN[decimals] + digits_value(chunk, decimals)) /
                   POWERS_OF_TEN[decimals];
        *value = negative ? -v : v;
        *after = next;
        return p + 1 + decimals;
    }
    if ((next | 0x20) == 'e')
        return NULL;
    *value = negative && mantissa ? -(double)mantissa : (double)mantissa; /* "-0" is orjson's int 0: numpy's +0.0 */
    *after = next;
    return p;
}

/* The number at r->p (JSON's grammar, nothing more) into *n, r->p past it. 0, or -1 with Declined set. */
static int read_number(Reader *r, Number *n) {
    const char *start = r->p, *p = r->p, *end = r->end;
    int negative = 0, digits = 0, overflow = 0, has_fraction = 0, has_exponent = 0;
    uint64_t mantissa = 0;
    long exponent = 0;

    if (p < end && *p == '-') {
        negative = 1;
        p++;
    }
    if (p >= end || !is_digit(*p))
        goto bad;
    if (*p == '0') {
        p++;
    } else {
        for (; p < end && is_digit(*p); p++) {
            if (digits < 19) {
                mantissa = mantissa * 10 + (uint64_t)(*p - '0');
                if (mantissa)
                    digits++;
            } else {
                overflow = 1;
            }
        }
    }
    int integer_digits = digits;
    if (p < end && *p == '.') {
        has_fraction = 1;
        p++;
        if (p >= end || !is_digit(*p))
            goto bad;
        for (; p < end && is_digit(*p); p++) {
            if (digits < 19) {
                mantissa = mantissa * 10 + (uint64_t)(*p - '0');
                if (mantissa)
                    digits++;
                exponent--;
            } else {
                overflow = 1;
            }
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        has_exponent = 1;
        p++;
        int exponent_negative = 0;
        if (p < end && (*p == '+' || *p == '-'))
            exponent_negative = *p++ == '-';
        if (p >= end || !is_digit(*p))
            goto bad;
        long written = 0;
        for (; p < end && is_digit(*p); p++)
            if (written < 100000)
                written = written * 10 + (*p - '0');
        exponent += exponent_negative ? -written : written;
    }
    r->p = p;

    n->is_integer = !has_fraction && !has_exponent;
    n->too_large = n->is_integer && (overflow || integer_digits > 18);
    n->exact_integer = n->is_integer && !overflow && mantissa <= (UINT64_C(1) << 53);
    if (n->is_integer && !n->too_large) {
        n->integer = negative ? -(int64_t)mantissa : (int64_t)mantissa;
        n->value = (double)n->integer; /* "-0" is orjson's int 0, which numpy makes +0.0 */
        return 0;
    }
    if (!overflow && mantissa <= (UINT64_C(1) << 53) && exponent >= -22 && exponent <= 22) {
        double v = (double)mantissa;
        v = exponent < 0 ? v / POWERS_OF_TEN[-exponent] : v * POWERS_OF_TEN[exponent];
        n->value = negative ? -v : v;
        return 0;
    }
    /* PyOS_string_to_double reads past the token when the text goes on with digits; a NUL-terminated copy keeps it
     * to the token. */
    char copy[MAX_SLOW_NUMBER + 1];
    Py_ssize_t length = p - start;
    if (length > MAX_SLOW_NUMBER)
        goto bad;
    memcpy(copy, start, (size_t)length);
    copy[length] = '\0';
    char *parsed_to;
    double v = PyOS_string_to_double(copy, &parsed_to, PyExc_OverflowError);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        goto bad;
    }
    if (parsed_to != copy + length)
        goto bad;
    n->value = v;
    return 0;
bad:
    PyErr_SetNone(Declined);
    return -1;
}

static PyObject *read_value(Reader *r);

static PyObject *read_string(Reader *r) {
    const char *start = ++r->p, *p = start, *end = r->end;
    for (; p < end && *p != '"'; p++)
        if (*p == '\\' || (unsigned char)*p < 0x20)
            return declined();
    if (p >= end)
        return declined();
    r->p = p + 1;
    PyObject *s = PyUnicode_DecodeUTF8(start, p - start, NULL);
    if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
        return declined();
    }
    return s;
}

/* Room for one more number in r->numbers: 0, or -1 with MemoryError set. */
static int grow_numbers(Reader *r) {
    Py_ssize_t capacity = r->capacity ? 2 * r->capacity : 4096;
    double *grown = PyMem_Realloc(r->numbers, (size_t)capacity * sizeof(double));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    r->numbers = grown;
    r->capacity = capacity;
    return 0;
}

/* The features value at r->p (a '[') as make_array(buffer, shape) where it is a rectangle of numbers; otherwise
 * NULL with no error set and r->p where it was. NULL with an error set: out of memory or make_array failed.
 * The text is walked with a local pointer and each number's following byte taken from the bytes its digits were
 * read with: through r->p, every number's reading waited on stores and loads of the one before. */
static PyObject *read_rectangle(Reader *r) {
    const char *start = r->p, *p = r->p, *end = r->end;
    Py_ssize_t shape[MAX_DIMS], items[MAX_DIMS];
    int depth = 0, dims = -1; /* depth: lists open; dims: the depth at which the first number was found */
    for (int i = 0; i < MAX_DIMS; i++)
        shape[i] = -1;
    r->count = 0;

    for (;;) {
        /* at the start of an element */
        if (*p == '[') {
            if (depth == MAX_DIMS)
                goto not_rectangle;
            items[depth++] = 0;
            p = past_space(p + 1, end);
            if (p >= end || *p == ']')
                goto not_rectangle;
            continue;
        }
        if (dims < 0)
            dims = depth;
        if (depth != dims)
            goto not_rectangle;
        /* the innermost list's numbers, up to its ']' */
        char after;
        for (;;) {
            if (r->count == r->capacity && grow_numbers(r) < 0)
                return NULL;
            const char *q = end - p >= SHORT_NUMBER_SPAN ? read_short_number(p, r->numbers + r->count, &after) : NULL;
            if (q == NULL) {
                Number n;
                r->p = p;
                if (read_number(r, &n) < 0) {
                    PyErr_Clear();
                    goto not_rectangle;
                }
                if (n.is_integer && !n.exact_integer)
                    goto not_rectangle;
                r->numbers[r->count] = n.value;
                q = r->p;
                after = q < end ? *q : '\0';
            }
            p = q;
            r->count++;
            items[depth - 1]++;
            if (after == ',') {
                p = past_space(p + 1, end);
                if (p >= end)
                    goto not_rectangle;
                if (*p == '[')
                    goto not_rectangle;
                continue;
            }
            break;
        }
        /* after an element: a comma and the next, or the end of one or more lists */
        for (;;) {
            p = past_space(p, end);
            if (p >= end)
                goto not_rectangle;
            if (*p == ',') {
                p = past_space(p + 1, end);
                if (p >= end)
                    goto not_rectangle;
                break;
            }
            if (*p != ']')
                goto not_rectangle;
            p++;
            depth--;
            if (shape[depth] < 0)
                shape[depth] = items[depth];
            else if (shape[depth] != items[depth])
                goto not_rectangle;
            if (depth == 0)
                goto done;
            items[depth - 1]++;
        }
    }
done:
    r->p = p;
    PyObject *shape_tuple = PyTuple_New(dims);
    if (shape_tuple == NULL)
        return NULL;
    for (int i = 0; i < dims; i++) {
        PyObject *size = PyLong_FromSsize_t(shape[i]);
        if (size == NULL) {
            Py_DECREF(shape_tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(shape_tuple, i, size);
    }
    PyObject *buffer = PyBytes_FromStringAndSize((const char *)r->numbers, r->count * (Py_ssize_t)sizeof(double));
    if (buffer == NULL) {
        Py_DECREF(shape_tuple);
        return NULL;
    }
    PyObject *array = PyObject_CallFunctionObjArgs(r->make_array, buffer, shape_tuple, NULL);
    Py_DECREF(buffer);
    Py_DECREF(shape_tuple);
    return array;
not_rectangle:
    r->p = start;
    return NULL;
}

/* Past the opening bracket at r->p: 1 if the object or array is empty (r->p past `closer`), 0 if members follow. */
static int open_container(Reader *r, char closer) {
    r->p++;
    skip_space(r);
    if (r->p < r->end && *r->p == closer) {
        r->p++;
        return 1;
    }
    return 0;
}

/* After a member: 1 if another follows (r->p at it), 0 if the container closed (r->p past `closer`), -1 with
 * Declined set. */
static int next_member(Reader *r, char closer) {
    skip_space(r);
    if (r->p < r->end && *r->p == ',') {
        r->p++;
        skip_space(r);
        return 1;
    }
    if (r->p < r->end && *r->p == closer) {
        r->p++;
        return 0;
    }
    PyErr_SetNone(Declined);
    return -1;
}

static PyObject *read_object(Reader *r) {
    PyObject *dict = PyDict_New();
    if (dict == NULL || open_container(r, '}'))
        return dict;
    for (;;) {
        if (r->p >= r->end || *r->p != '"')
            goto bad;
        PyObject *key = read_string(r);
        if (key == NULL)
            goto fail;
        skip_space(r);
        if (r->p >= r->end || *r->p != ':') {
            Py_DECREF(key);
            goto bad;
        }
        r->p++;
        skip_space(r);
        PyObject *value = NULL;
        if (r->p < r->end && *r->p == '[' && PyUnicode_GET_LENGTH(key) == 8 &&
            PyUnicode_CompareWithASCIIString(key, "features") == 0) {
            value = read_rectangle(r);
            if (value == NULL && PyErr_Occurred()) {
                Py_DECREF(key);
                goto fail;
            }
        }
        if (value == NULL)
            value = read_value(r);
        if (value == NULL) {
            Py_DECREF(key);
            goto fail;
        }
        Py_ssize_t before = PyDict_GET_SIZE(dict);
        int failed = PyDict_SetItem(dict, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (failed)
            goto fail;
        if (PyDict_GET_SIZE(dict) == before)
            goto bad;
        int more = next_member(r, '}');
        if (more < 0)
            goto fail;
        if (!more)
            return dict;
    }
bad:
    PyErr_SetNone(Declined);
fail:
    Py_DECREF(dict);
    return NULL;
}

static PyObject *read_array(Reader *r) {
    PyObject *list = PyList_New(0);
    if (list == NULL || open_container(r, ']'))
        return list;
    for (;;) {
        PyObject *value = read_value(r);
        if (value == NULL)
            goto fail;
        int failed = PyList_Append(list, value);
        Py_DECREF(value);
        if (failed)
            goto fail;
        int more = next_member(r, ']');
        if (more < 0)
            goto fail;
        if (!more)
            return list;
    }
fail:
    Py_DECREF(list);
    return NULL;
}

static PyObject *read_literal(Reader *r, const char *word, PyObject *value) {
    size_t length = strlen(word);
    if ((size_t)(r->end - r->p) < length || memcmp(r->p, word, length) != 0)
        return declined();
    r->p += length;
    return Py_NewRef(value);
}

static PyObject *read_value(Reader *r) {
    if (r->p >= r->end)
        return declined();
    if (++r->depth > MAX_DEPTH)
        return declined();
    PyObject *value;
    switch (*r->p) {
    case '{':
        value = read_object(r);
        break;
    case '[':
        value = read_array(r);
        break;
    case '"':
        value = read_string(r);
        break;
    case 't':
        value = read_literal(r, "true", Py_True);
        break;
    case 'f':
        value = read_literal(r, "false", Py_False);
        break;
    case 'n':
        value = read_literal(r, "null", Py_None);
        break;
    default: {
        Number n;
        if (read_number(r, &n) < 0)
            value = NULL;
        else if (n.is_integer)
            value = n.too_large ? declined() : PyLong_FromLongLong(n.integer);
        else
            value = PyFloat_FromDouble(n.value);
    }
    }
    r->depth--;
    return value;
}

static PyObject *parse(PyObject *module, PyObject *args) {
    Py_buffer data;
    PyObject *make_array;
    if (!PyArg_ParseTuple(args, "y*O:parse", &data, &make_array))
        return NULL;
    Reader r = {.p = data.buf, .end = (const char *)data.buf + data.len, .make_array = make_array};
    skip_space(&r);
    PyObject *value = read_value(&r);
    if (value != NULL) {
        skip_space(&r);
        if (r.p != r.end) {
            Py_SETREF(value, NULL);
            PyErr_SetNone(Declined);
        }
    }
    PyMem_Free(r.numbers);
    PyBuffer_Release(&data);
    return value;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_VARARGS,
     "parse(data, make_array): the JSON text `data` as Python values, each rectangular nest of numbers under a "
     "\"features\" key as make_array(float64 bytes, shape); raises Declined where orjson should read it instead."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_bodyjson",
    "JSON request bodies with listed features read into float64 buffers (srcid/service/bodies.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__bodyjson(void) {
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    Declined = PyErr_NewExceptionWithDoc("srcid.service._bodyjson.Declined",
                                         "A text this parser does not read exactly as orjson would: read it with "
                                         "orjson instead.",
                                         PyExc_ValueError, NULL);
    if (Declined == NULL || PyModule_AddObjectRef(module, "Declined", Declined) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
