-- The benchmark's wrk script (bench/loadgen.py writes its plan, starts wrk and reads what this prints).
--
--   wrk -t N -c N -d BUDGET -s bench/loadgen.lua URL -- PLAN DURATION
--
-- One connection per thread (-t = -c): a thread's requests and answers then alternate, so each answer is
-- checked against its own request and timed here, and each client sends its requests in plan order. The
-- plan has one line a request, tab-separated: client index (a thread's, from 0), method, path, the JSON key
-- and string value a good answer carries (or empty), body. With DURATION 0, a thread sends its requests
-- once, then prints its line and stops; otherwise it cycles through them until DURATION seconds have
-- passed since its first request. Latencies are timed here, not taken from wrk's histogram: wrk "corrects"
-- that for coordinated omission with synthetic samples before done() sees it.

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } loadgen_timespec;
int clock_gettime(int clk_id, loadgen_timespec *tp);
]])
local ts = ffi.new("loadgen_timespec")
local function clock(id)
  ffi.C.clock_gettime(id, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local function now() -- CLOCK_MONOTONIC, the clock of Python's time.monotonic
  return clock(1)
end
local function thread_cpu() -- CLOCK_THREAD_CPUTIME_ID: this thread's CPU time
  return clock(3)
end

-- the main state: number the threads (id is global in each thread's state)
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

local reqs, checks = {}, {}
local duration, deadline
local verifying = false -- wrk calls request() once on the first thread before the run, to check it
local current, pending, t_sent = 0, false, 0
local sent, ok, status_errors, mismatch, lost = 0, 0, 0, 0, 0
local codes, lat = {}, {}
local first_error = "" -- what the first failure was: a status and the start of its body
local first, last = 0, 0
local cpu0 = 0
local finished = false

local function plain(s) -- a Lua pattern matching s literally
  return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
end

function init(args) -- args[0] is the URL
  local plan = args[#args - 1]
  duration = tonumber(args[#args]) or 0
  for line in io.lines(plan) do
    local client, method, path, key, value, body = line:match("^(%d+)\t(%u+)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    if client == nil then
      error("not a plan line: " .. line)
    end
    if tonumber(client) == id - 1 then
      local headers = {}
      for name, v in pairs(wrk.headers) do
        headers[name] = v
      end
      if body == "" then
        body = nil
        if method == "POST" or method == "PUT" then
          body = ""
        end
      else
        headers["Content-Type"] = "application/json"
      end
      reqs[#reqs + 1] = wrk.format(method, path, headers, body)
      checks[#checks + 1] = key ~= "" and ('"' .. plain(key) .. '"%s*:%s*"' .. plain(value) .. '"') or false
    end
  end
  if #reqs == 0 then
    error("no request for thread " .. id .. " in " .. plan)
  end
  verifying = id == 1
end

local function finish()
  if finished then
    return
  end
  finished = true
  local cpu = thread_cpu() - cpu0
  local us = {}
  for i = 1, #lat do
    us[i] = string.format("%.1f", lat[i] * 1e6)
  end
  local c = {}
  for code, n in pairs(codes) do
    c[#c + 1] = code .. ":" .. n
  end
  local err = first_error:gsub(".", function(ch) return string.format("%02x", ch:byte()) end) -- hex: one word
  -- one write of one line: threads share stdout
  io.stdout:write(string.format(
    "@client %d sent=%d ok=%d status=%d mismatch=%d lost=%d first=%.9f last=%.9f cpu=%.9f codes=%s err=%s lat=%s\n",
    id - 1, sent, ok, status_errors, mismatch, lost, first, last, cpu, table.concat(c, ","), err, table.concat(us, ",")
  ))
  io.stdout:flush()
  wrk.thread:stop()
end

local function error_seen(text)
  if first_error == "" then
    first_error = text:sub(1, 200)
  end
end

local function over()
  if deadline then
    return last >= deadline
  end
  return ok + status_errors + mismatch + lost >= #reqs
end

function request()
  if verifying then
    verifying = false
    return reqs[1]
  end
  if pending then -- wrk asks again without an answer: the connection broke and wrk reconnected
    lost = lost + 1
    error_seen("no answer: the connection broke")
    pending = false
    last = now()
    if over() then
      finish() -- this request, asked for after the end, goes out uncounted as the thread stops
      return reqs[1]
    end
  end
  current = current % #reqs + 1
  t_sent = now()
  if sent == 0 then
    cpu0 = thread_cpu() -- from the first request: the thread's connection is open by now
    first = t_sent
    if duration > 0 then
      deadline = first + duration
    end
  end
  sent = sent + 1
  pending = true
  return reqs[current]
end

function response(status, headers, body)
  local t = now()
  pending = false
  last = t
  if status ~= 200 then
    status_errors = status_errors + 1
    codes[status] = (codes[status] or 0) + 1
    error_seen(status .. ": " .. body:sub(1, 150))
  elseif checks[current] and not body:find(checks[current]) then
    mismatch = mismatch + 1
    error_seen("200 without the expected value: " .. body:sub(1, 150))
  else
    ok = ok + 1
    lat[ok] = t - t_sent
  end
  if over() then
    finish()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.stdout:write(string.format(
    "@wrk requests=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, e.connect, e.read, e.write, e.status, e.timeout
  ))
  io.stdout:flush()
end
