-- wrk script: V2 infer against a uniformly random model, with a random probe body, on every request.
--   WRK_NAMES  file with one model name per line
--   WRK_BODIES file with one V2 infer JSON body per line
-- At the end it prints one line "WRK_JSON {...}" with the counts and latency percentiles (microseconds).

local function read_lines(path)
  local lines = {}
  for line in io.lines(path) do
    if #line > 0 then lines[#lines + 1] = line end
  end
  assert(#lines > 0, "no lines in " .. path)
  return lines
end

local names = read_lines(os.getenv("WRK_NAMES"))
local bodies = read_lines(os.getenv("WRK_BODIES"))
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
  local name = names[math.random(#names)]
  local body = bodies[math.random(#bodies)]
  return wrk.format("POST", "/v2/models/" .. name .. "/infer", headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, '
      .. '"write_errors": %d, "non_2xx": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
      .. '"max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
