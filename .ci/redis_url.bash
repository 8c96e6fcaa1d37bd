# The tests' Redis URL as .ci/run reads it, to probe that server and to tell whether it may
# start one: sourced by .ci/run, and by tests/test_ci_redis_url.py, which checks the parsing.
# Nothing here prints the URL's username or password.

# parse_redis_url URL: set redis_host (an IPv6 address without its brackets), redis_port
# (default 6379), redis_tls (1 for rediss://, else 0), redis_user and redis_password
# (percent-decoded; empty when absent) and redis_shown (host:port, [v6]:port, for messages).
# A URL it cannot read: a message on stderr (without its credentials), status 1.
parse_redis_url() {
  local url=$1 rest authority hostport port
  redis_host='' redis_port=6379 redis_tls=0 redis_user='' redis_password='' redis_shown=''
  case ${url%%://*} in
    redis) ;;
    rediss) redis_tls=1 ;;
    *)
      echo "QTASKS_TEST_REDIS: not a redis:// or rediss:// URL" >&2
      return 1
      ;;
  esac
  rest=${url#*://}
  authority=${rest%%[/?#]*} # up to the path (the db), the query or the fragment
  hostport=${authority##*@}
  if [[ $authority == *@* ]]; then
    local userinfo=${authority%@*}
    if [[ $userinfo == *:* ]]; then
      redis_user=$(_redis_url_decode "${userinfo%%:*}")
      redis_password=$(_redis_url_decode "${userinfo#*:}")
    else
      redis_user=$(_redis_url_decode "$userinfo")
    fi
  fi
  if [[ $hostport == \[* ]]; then # [IPv6 address]:port
    redis_host=${hostport#\[}
    redis_host=${redis_host%%\]*}
    port=${hostport#*\]}
    if [[ $hostport != *\]* || (-n $port && $port != :*) ]]; then
      echo "QTASKS_TEST_REDIS: a bracketed IPv6 host is [address] or [address]:port" >&2
      return 1
    fi
    port=${port#:}
  else
    redis_host=${hostport%%:*}
    port=''
    if [[ $hostport == *:* ]]; then port=${hostport#*:}; fi
  fi
  if [[ -z $redis_host ]]; then
    echo "QTASKS_TEST_REDIS: the URL names no host" >&2
    return 1
  fi
  if [[ -n $port ]]; then
    if [[ ! $port =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
      echo "QTASKS_TEST_REDIS: the port is not a number from 1 to 65535" >&2
      return 1
    fi
    redis_port=$((10#$port))
  fi
  if [[ $redis_host == *:* ]]; then
    redis_shown="[$redis_host]:$redis_port"
  else
    redis_shown="$redis_host:$redis_port"
  fi
}

# _redis_url_decode TEXT: TEXT with its %XX escapes decoded (backslashes kept as they are).
_redis_url_decode() {
  local text=${1//\\/\\\\}
  printf '%b' "${text//%/\\x}"
}

# redis_loopback: whether the parsed host is this machine's loopback, where .ci/run may start
# a plain Redis (bound to 127.0.0.1 and ::1).
redis_loopback() {
  [[ $redis_host == localhost || $redis_host == 127.0.0.1 || $redis_host == ::1 ]]
}

# redis_cli_options: the redis-cli options that reach the parsed server, in the array
# redis_cli_args: host, port, --user when the URL has one, --tls for rediss://. The password
# goes through REDISCLI_AUTH (see redis_ping), not the command line. (redis-cli's own -u does
# not read a bracketed IPv6 host.)
redis_cli_options() {
  redis_cli_args=(-h "$redis_host" -p "$redis_port")
  if [[ -n $redis_user ]]; then redis_cli_args+=(--user "$redis_user"); fi
  if ((redis_tls)); then redis_cli_args+=(--tls); fi
}

# redis_ping: whether the parsed server answers PING within 5 s. Over TLS redis-cli verifies
# the server's certificate against the system's CA store (no client certificate).
redis_ping() {
  redis_cli_options
  local answer
  if [[ -n $redis_password ]]; then
    answer=$(REDISCLI_AUTH=$redis_password timeout 5 redis-cli "${redis_cli_args[@]}" ping 2>/dev/null)
  else
    answer=$(timeout 5 redis-cli "${redis_cli_args[@]}" ping 2>/dev/null)
  fi
  [[ $answer == PONG ]]
}
